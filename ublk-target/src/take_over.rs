//! Taking over a device whose server died: the control a new server
//! recovers it with, and the wait for the kernel to quiesce it.
//!
//! From the old server's end until the new one's FETCHes nothing serves the
//! device, and it may be the swap that holds pages this process needs. So a
//! take-over reads no file: opening a libublk control for an existing
//! device reads the device's JSON export in /run/ublksrvd, which is tmpfs,
//! and under memory pressure that page may have gone to swap on this very
//! device (a take-over hung so on 7.3, 2026-12-03: docs/design.md). A
//! standby opens its control while the device is still served
//! ([`prepare_recovery`]); a server forked fresh first replaces the export,
//! unread, with a stand-in of its own ([`replace_export_unread`]).

use crate::features::IoCommands;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::{sys, UblkFlags};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Every device is added with user recovery and re-issue: when its server
/// dies the kernel keeps `/dev/ublkbN`, holds new I/O and requeues what was
/// in flight, until a new server attaches with `Start::Recover`.
const RECOVERY_FLAGS: u64 = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;

/// How long a recovering server waits for the kernel to notice the old
/// server is gone and quiesce the device (at once on new kernels; within
/// the request timeout or the 5 s monitor of older ones: request_timeout.rs).
const QUIESCE_WAIT: Duration = Duration::from_secs(30);

/// Why a device could not be taken over.
#[derive(Debug, Error)]
#[error("recovering ublk device {id}: {why}")]
pub struct RecoverError {
    pub id: u32,
    pub why: String,
}

/// The builder every control of ours starts from: recovery asked for, and
/// QUIESCE (for upgrades) and, unless `commands` says per-tag, BATCH_IO
/// where the kernel offers them; a recovery takes the device's own flags.
pub(crate) fn control_builder(max_io_bytes: u32, commands: IoCommands) -> UblkCtrlBuilder<'static> {
    let mut offered =
        libublk::ctrl::UblkCtrl::get_features().map_or(0, crate::features::offered_in_use);
    if commands == IoCommands::PerTag {
        offered &= !(sys::UBLK_F_BATCH_IO as u64);
    }
    UblkCtrlBuilder::default()
        .name("vramblk")
        .io_buf_bytes(max_io_bytes)
        .ctrl_flags(RECOVERY_FLAGS | offered)
}

/// A control for recovering a device, opened while the device was still
/// served (by a standby, as it readies).
pub struct PreparedRecovery {
    ctrl: UblkCtrl,
}

/// Opens the [`PreparedRecovery`] for live device `id`, for io buffers of
/// `max_io_bytes`; its queue count and depth are read from the device.
pub fn prepare_recovery(max_io_bytes: u32, id: u32) -> Result<PreparedRecovery, RecoverError> {
    let info = UblkCtrl::new_simple(id as i32)
        .map_err(|e| RecoverError {
            id,
            why: format!("the device cannot be opened ({})", said(&e)),
        })?
        .dev_info();
    let ctrl = recovery_control(max_io_bytes, id, info.nr_hw_queues, info.queue_depth)?;
    Ok(PreparedRecovery { ctrl })
}

/// Takes device `id` over: with `prepared` where a standby opened it for
/// this device, else with a control opened now; waits for the kernel to
/// quiesce the device, then starts the recovery (START_USER_RECOVERY).
pub(crate) fn recover(
    prepared: Option<PreparedRecovery>,
    max_io_bytes: u32,
    id: u32,
) -> Result<UblkCtrl, RecoverError> {
    let ctrl = match prepared {
        Some(PreparedRecovery { ctrl }) if ctrl.dev_info().dev_id == id => ctrl,
        _ => {
            if let Err(e) = replace_export_unread(id) {
                // Then libublk reads the export itself, as before.
                log::warn!("ublk device {id}: its JSON export was not replaced ({e})");
            }
            let probe = UblkCtrl::new_simple(id as i32).map_err(|e| RecoverError {
                id,
                why: format!("the device cannot be opened ({})", said(&e)),
            })?;
            let (queues, depth) = wait_quiesced(&probe)?;
            recovery_control(max_io_bytes, id, queues, depth)?
        }
    };
    wait_quiesced(&ctrl)?;
    // Everything that can be done before START_USER_RECOVERY is: from there
    // until every queue fetched, a death of this server can break the
    // device (gate.rs).
    start_recovery(&ctrl, id, max_io_bytes)?;
    Ok(ctrl)
}

fn recovery_control(
    max_io_bytes: u32,
    id: u32,
    queues: u16,
    depth: u16,
) -> Result<UblkCtrl, RecoverError> {
    // The device keeps the commands it was added with: the kernel's flags
    // replace these when the control reads the device (wait_quiesced).
    control_builder(max_io_bytes, IoCommands::Auto)
        .id(id as i32)
        .nr_queues(queues)
        .depth(depth)
        .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
        .build()
        .map_err(|e| RecoverError { id, why: said(&e) })
}

/// libublk's error with the kernel's errno named (its own text for a
/// failed command does not say which).
pub(crate) fn said(e: &libublk::UblkError) -> String {
    match e {
        libublk::UblkError::UringIOError(n) | libublk::UblkError::OtherError(n) if *n < 0 => {
            format!("{e}: {}", std::io::Error::from_raw_os_error(-n))
        }
        _ => e.to_string(),
    }
}

/// Where libublk keeps device `id`'s JSON export.
fn export_path(id: u32) -> PathBuf {
    PathBuf::from(format!("{}/{id:04}.json", UblkCtrl::run_dir()))
}

/// Puts an empty JSON object, written now (so resident), in place of
/// device `id`'s export without reading the old one: libublk then reads
/// the stand-in, takes the device's shape from the kernel, and writes the
/// export anew once the device serves.
pub(crate) fn replace_export_unread(id: u32) -> std::io::Result<()> {
    replace_unread(&export_path(id))
}

/// Renames a fresh `{}` over `path`, if there is a file there: a rename
/// reads no file content, and a swapped-out page of the old file is
/// dropped with it. No file, nothing to replace.
fn replace_unread(path: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    let stand_in = path.with_extension("json.taking-over");
    std::fs::write(&stand_in, b"{}")?;
    std::fs::rename(&stand_in, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&stand_in);
    })
}

/// Waits until the kernel has quiesced the device `ctrl` controls (its old
/// server gone); returns the device's queue count and depth. Polls with
/// GET_DEV_INFO through `ctrl`: a new control each time would read the
/// JSON export again.
fn wait_quiesced(ctrl: &UblkCtrl) -> Result<(u16, u16), RecoverError> {
    let id = ctrl.dev_info().dev_id;
    let fail = |why: String| RecoverError { id, why };
    let deadline = Instant::now() + QUIESCE_WAIT;
    loop {
        ctrl.read_dev_info()
            .map_err(|e| fail(format!("its state cannot be read ({})", said(&e))))?;
        let info = ctrl.dev_info();
        if info.flags & RECOVERY_FLAGS == 0 {
            return Err(fail("it was added without user recovery".into()));
        }
        match info.state as u32 {
            sys::UBLK_S_DEV_QUIESCED => return Ok((info.nr_hw_queues, info.queue_depth)),
            sys::UBLK_S_DEV_LIVE if Instant::now() < deadline => {
                // The kernel has not yet seen the old server die.
                std::thread::sleep(Duration::from_millis(100));
            }
            sys::UBLK_S_DEV_LIVE => {
                return Err(fail(format!(
                    "it is still live after {} s: is its server running?",
                    QUIESCE_WAIT.as_secs()
                )))
            }
            state => return Err(fail(format!("it is in state {state}, not quiesced"))),
        }
    }
}

/// START_USER_RECOVERY on a quiesced device. Kernels before ublk's recovery
/// rework refuse it (EINVAL) when the last server died after its own START
/// and before any of its queues was ready: the device is then stranded
/// (stranded.rs), and is freed by fetching every tag from here; failing
/// that, this server goes on from the dead one's START (which works if
/// that one died before it mapped its command buffers; gate.rs).
///
/// While the dead server's `/dev/ublkcN` is still open (its io_uring is torn
/// down after the process is gone, and on 6.12 the kernel quiesces the
/// device before that), the kernel answers EBUSY; libublk asks again for
/// 30 s and then hands the EBUSY back as a success value, which is a
/// failure here: the queues could not open the device.
fn start_recovery(ctrl: &UblkCtrl, id: u32, max_io_bytes: u32) -> Result<(), RecoverError> {
    if started_recovery(id, ctrl.start_user_recover())? == Started::Yes {
        return Ok(());
    }
    let info = ctrl.dev_info();
    let shape = crate::stranded::Shape {
        cdev: ctrl.get_cdev_path(),
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
        flags: info.flags,
    };
    log::warn!(
        "ublk device {id}: START_USER_RECOVERY refused (EINVAL): its last server died inside its \
         own recovery; fetching every tag from here, unmapped, to free the device"
    );
    if let Err(why) = crate::stranded::free(shape, max_io_bytes) {
        log::warn!("ublk device {id}: not freed ({why}); resuming the dead server's recovery");
        return Ok(());
    }
    match started_recovery(id, ctrl.start_user_recover())? {
        Started::Yes => {
            log::info!("ublk device {id}: freed: START_USER_RECOVERY accepted after the fetches")
        }
        Started::Stranded => log::warn!(
            "ublk device {id}: START_USER_RECOVERY still refused after the fetches; resuming the \
             dead server's recovery"
        ),
    }
    Ok(())
}

/// How START_USER_RECOVERY went.
#[derive(Debug, PartialEq, Eq)]
enum Started {
    Yes,
    /// Refused (EINVAL): the last server died inside its own recovery.
    Stranded,
}

/// What START_USER_RECOVERY's answer `answer` means for device `id`.
fn started_recovery(
    id: u32,
    answer: Result<i32, libublk::UblkError>,
) -> Result<Started, RecoverError> {
    match answer {
        Ok(r) if r == -libc::EBUSY => Err(RecoverError {
            id,
            why: format!(
                "START_USER_RECOVERY answered EBUSY for 30 s: the dead server's \
                 /dev/ublkc{id} is still open"
            ),
        }),
        Ok(r) if r < 0 => Err(RecoverError {
            id,
            why: format!(
                "START_USER_RECOVERY failed ({})",
                std::io::Error::from_raw_os_error(-r)
            ),
        }),
        Ok(_) => Ok(Started::Yes),
        Err(libublk::UblkError::UringIOError(e)) if e == -libc::EINVAL => Ok(Started::Stranded),
        Err(e) => Err(RecoverError {
            id,
            why: format!("START_USER_RECOVERY failed ({})", said(&e)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty directory of this test's own.
    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vramblk-take-over-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn the_export_is_replaced_by_an_empty_object_and_nothing_is_left_beside_it() {
        let dir = scratch("replaced");
        let export = dir.join("0003.json");
        std::fs::write(&export, br#"{"dev_info":{"dev_id":3},"target":{}}"#).expect("write");
        replace_unread(&export).expect("replace");
        assert_eq!(std::fs::read_to_string(&export).expect("read"), "{}");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["0003.json"]);
        // What libublk does with it: an object it parses.
        let parsed: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&export).expect("read")).expect("json");
        assert!(parsed.as_object().is_some_and(|o| o.is_empty()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_busy_answer_handed_back_as_a_value_is_a_failure() {
        let busy = started_recovery(2, Ok(-libc::EBUSY)).expect_err("EBUSY is not a start");
        assert!(
            busy.why.contains("/dev/ublkc2 is still open"),
            "{}",
            busy.why
        );
        assert!(started_recovery(2, Ok(-libc::EPERM)).is_err());
        assert_eq!(started_recovery(2, Ok(0)).ok(), Some(Started::Yes));
        // The kernel's EINVAL after a death inside the last recovery.
        assert_eq!(
            started_recovery(2, Err(libublk::UblkError::UringIOError(-libc::EINVAL))).ok(),
            Some(Started::Stranded)
        );
        assert!(started_recovery(2, Err(libublk::UblkError::UringIOError(-libc::ENODEV))).is_err());
    }

    #[test]
    fn a_failed_command_says_its_errno() {
        let said = said(&libublk::UblkError::UringIOError(-libc::ENODEV));
        assert!(said.starts_with("io_uring IO failure: "), "{said}");
        assert!(said.contains(&std::io::Error::from_raw_os_error(libc::ENODEV).to_string()));
        assert_eq!(
            super::said(&libublk::UblkError::InvalidVal),
            libublk::UblkError::InvalidVal.to_string()
        );
    }

    #[test]
    fn no_export_no_stand_in() {
        let dir = scratch("absent");
        let export = dir.join("0000.json");
        replace_unread(&export).expect("nothing to do");
        assert!(std::fs::read_dir(&dir).expect("read_dir").next().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_export_path_is_libublks() {
        assert_eq!(export_path(7), PathBuf::from("/run/ublksrvd/0007.json"));
    }
}
