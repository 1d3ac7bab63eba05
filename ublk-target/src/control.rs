//! Finding, inspecting and deleting ublk devices from outside their daemon.

use libublk::ctrl::UblkCtrl;
use libublk::sys;
use std::path::Path;
use thiserror::Error;

pub const CONTROL_NODE: &str = "/dev/ublk-control";

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("ublk_drv is not loaded ({CONTROL_NODE} is missing): run `modprobe ublk_drv`")]
    NoDriver,
    #[error(
        "this kernel ({0}) has no ublk driver: it was built without CONFIG_BLK_DEV_UBLK \
         (Debian 12's own 6.1 kernel is; its bookworm-backports 6.12 kernel has it). vramblk \
         needs a kernel with ublk; tested on 6.12 and 7.3"
    )]
    NotBuilt(String),
    #[error(
        "this kernel's ublk driver lacks {name} (features {features:#x}), which vramblk needs: \
         {why}; run a newer kernel"
    )]
    MissingFeature {
        name: &'static str,
        why: &'static str,
        features: u64,
    },
    #[error("there is no ublk device {0}")]
    NoDevice(u32),
    #[error("deleting ublk device {id}: {why}")]
    Delete { id: u32, why: String },
    #[error("quiescing ublk device {id}: {why}")]
    Quiesce { id: u32, why: String },
}

/// The kernel's view of a device's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceState {
    Live,
    Dead,
    Quiesced,
    FailIo,
    Unknown(u16),
}

impl DeviceState {
    /// The state the kernel reports in a device's info.
    pub fn from_kernel(state: u16) -> DeviceState {
        match u32::from(state) {
            sys::UBLK_S_DEV_LIVE => DeviceState::Live,
            sys::UBLK_S_DEV_DEAD => DeviceState::Dead,
            sys::UBLK_S_DEV_QUIESCED => DeviceState::Quiesced,
            sys::UBLK_S_DEV_FAIL_IO => DeviceState::FailIo,
            _ => DeviceState::Unknown(state),
        }
    }
}

impl std::fmt::Display for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceState::Live => f.write_str("live"),
            DeviceState::Dead => f.write_str("dead"),
            DeviceState::Quiesced => f.write_str("quiesced"),
            DeviceState::FailIo => f.write_str("fail-io"),
            DeviceState::Unknown(n) => write!(f, "state-{n}"),
        }
    }
}

/// What `list` needs to know about one device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub id: u32,
    pub state: DeviceState,
    pub queues: u16,
    pub depth: u16,
    pub daemon_pid: i32,
}

pub fn require_driver() -> Result<(), ControlError> {
    if Path::new(CONTROL_NODE).exists() {
        return Ok(());
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    match kernel_has_ublk(release.trim(), Path::new("/")) {
        Some(false) => Err(ControlError::NotBuilt(release.trim().to_string())),
        _ => Err(ControlError::NoDriver),
    }
}

/// Whether kernel `release`, as installed under `root`, has the ublk driver
/// (built in or as a module); None when nothing there tells (no module
/// tree and no config, as in a bare initramfs).
fn kernel_has_ublk(release: &str, root: &Path) -> Option<bool> {
    let config = root.join(format!("boot/config-{release}"));
    if let Ok(text) = std::fs::read_to_string(config) {
        return Some(text.lines().any(|l| {
            l.starts_with("CONFIG_BLK_DEV_UBLK=y") || l.starts_with("CONFIG_BLK_DEV_UBLK=m")
        }));
    }
    let modules = root.join(format!("lib/modules/{release}"));
    let dep = std::fs::read_to_string(modules.join("modules.dep")).ok()?;
    let builtin = std::fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
    Some(dep.contains("/ublk_drv.ko") || builtin.contains("/ublk_drv.ko"))
}

/// Refuses a kernel whose ublk driver lacks a feature every device needs
/// (kernels before 6.5 do not report features: nothing is checked there,
/// and adding the device says what fails).
pub fn require_features() -> Result<(), ControlError> {
    let Some(features) = UblkCtrl::get_features() else {
        return Ok(());
    };
    match crate::features::missing(features).first() {
        Some(&(name, why)) => Err(ControlError::MissingFeature {
            name,
            why,
            features,
        }),
        None => Ok(()),
    }
}

/// Lets go of the control ring this thread inherited through fork, if its
/// parent's thread had one; the next control command makes a fresh one.
///
/// libublk keeps one io_uring per thread for control commands, made at the
/// first command, and a forked child's thread has its parent's: the same
/// ring fd, and its queues mapped shared. Two processes then answer their
/// commands from one completion queue, and a process killed between a
/// command and its answer (a crash storm during take-overs) leaves that
/// answer there: the next process reads it as the answer to its own
/// command, sees another token and takes it for no answer (EAGAIN), and
/// leaves its own for the next: every later server failed so at once
/// (the crash boot on 6.12.118, 2026-12-04: "the device cannot be opened
/// (io_uring IO failure: Resource temporarily unavailable)"). Call it in
/// the child right after fork; it closes only the child's copies.
pub fn forget_inherited_control_ring() {
    let _ = libublk::ublk_init_ctrl_task_ring(|ring| {
        *ring = None;
        Ok(())
    });
}

/// Ids of every ublk device the kernel knows, sorted.
pub fn device_ids() -> Vec<u32> {
    let mut ids = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/class/ublk-char") {
        for e in entries.flatten() {
            let name = e.file_name();
            if let Some(id) = name.to_str().and_then(|n| n.strip_prefix("ublkc")) {
                if let Ok(id) = id.parse() {
                    ids.push(id);
                }
            }
        }
    }
    ids.sort_unstable();
    ids
}

fn open(id: u32) -> Result<UblkCtrl, ControlError> {
    require_driver()?;
    if !device_ids().contains(&id) {
        return Err(ControlError::NoDevice(id));
    }
    let id32 = i32::try_from(id).map_err(|_| ControlError::NoDevice(id))?;
    UblkCtrl::new_simple(id32).map_err(|_| ControlError::NoDevice(id))
}

pub fn device_info(id: u32) -> Result<DeviceInfo, ControlError> {
    let ctrl = open(id)?;
    let info = ctrl.dev_info();
    Ok(DeviceInfo {
        id,
        state: DeviceState::from_kernel(info.state),
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
        daemon_pid: info.ublksrv_pid,
    })
}

/// Stops and removes device `id`; its daemon sees its queues abort and
/// exits. Returns once the kernel has released the device.
pub fn delete_device(id: u32) -> Result<(), ControlError> {
    delete(id, false)
}

/// Removes device `id` without waiting for its last user to let go (the
/// kernel's DEL_DEV_ASYNC, 6.10+; plain DEL_DEV on older kernels): its
/// disk goes at once, so waiting I/O fails, and the rest is freed when
/// the last reference drops. For giving up on a device whose server keeps
/// dying, where waiting could hang on requests no server will finish.
pub fn delete_device_nowait(id: u32) -> Result<(), ControlError> {
    delete(id, true)
}

fn delete(id: u32, nowait: bool) -> Result<(), ControlError> {
    // In a thread of its own: libublk's control ring is per thread, and a
    // command whose answer it did not wait for leaves that answer in the
    // ring, where the next command of the thread would read it as its own.
    let result = std::thread::scope(|s| {
        s.spawn(|| -> Result<Option<i32>, ControlError> {
            if nowait {
                // A give-up: the device has no server, and its JSON export,
                // which opening a control reads, may be in swap on it
                // (take_over.rs). It is going anyway.
                if let Err(e) = crate::take_over::replace_export_unread(id) {
                    log::warn!("ublk device {id}: its JSON export was not replaced ({e})");
                }
            }
            let ctrl = open(id)?;
            let r = if nowait {
                ctrl.del_dev_async()
            } else {
                ctrl.del_dev()
            };
            delete_answer(r).map_err(|why| ControlError::Delete { id, why })
        })
        .join()
        .unwrap_or_else(|_| {
            Err(ControlError::Delete {
                id,
                why: "the deleting thread panicked".into(),
            })
        })
    })?;
    match result {
        None => Ok(()),
        // A kernel before DEL_DEV_ASYNC does not know the command.
        Some(e) if nowait && e == -libc::EINVAL => delete(id, false),
        // The device was there when opened. The command went in, but its
        // answer did not come back as such: the wait was cut short (libublk
        // reports a wait that ended with no answer as EAGAIN, and its retry
        // then finds the device already going: ENODEV). The kernel is taking
        // the device down and waits for its last user to let go; wait here.
        Some(e)
            if [
                libc::EINTR,
                ERESTARTSYS,
                libc::EAGAIN,
                libc::ENODEV,
                libc::ENOENT,
            ]
            .contains(&-e) =>
        {
            log::debug!("deleting ublk device {id}: no clean answer ({e}); waiting for it to go");
            if nowait {
                Ok(())
            } else {
                wait_gone(id)
            }
        }
        Some(e) => Err(ControlError::Delete {
            id,
            why: std::io::Error::from_raw_os_error(-e).to_string(),
        }),
    }
}

/// What libublk's delete answered: None for done, Some(errno) for the
/// kernel's answer (`delete` tells which of those mean "going anyway"),
/// or why it failed otherwise.
fn delete_answer(r: Result<i32, libublk::UblkError>) -> Result<Option<i32>, String> {
    match r {
        // libublk hands an EBUSY back as a value, not an error.
        Ok(e) if e < 0 => Ok(Some(e)),
        Ok(_) => Ok(None),
        Err(libublk::UblkError::UringIOError(e) | libublk::UblkError::OtherError(e)) => Ok(Some(e)),
        // The command went through; then libublk removes its JSON export
        // of the device, and the server, seeing its device go, removes the
        // same file: whichever comes second finds it gone (seen in the VM:
        // `del` said it failed and the device was gone). The kernel's part
        // is done or under way: answered as a device already going.
        Err(libublk::UblkError::IOError(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(Some(-libc::ENOENT))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// How a hand-over can take device `id` from its server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandOver {
    /// Quiesced (UBLK_F_QUIESCE): the old server answers what it holds.
    Quiesce,
    /// The device was added without UBLK_F_QUIESCE (kernel before 6.16).
    NoQuiesce,
    /// The device uses batch commands (UBLK_F_BATCH_IO). On 7.3.4 the
    /// requests a quiesce caught on their way to the old server never
    /// reached the next one, and fio saw them fail with EIO (the VM's
    /// crash boot, 2026-12-03), while a killed server's requests are
    /// issued again to the next one; so these are not quiesced.
    BatchCommands,
}

/// How a hand-over can take device `id` from its server, by the flags the
/// device was added with.
pub fn hand_over(id: u32) -> Result<HandOver, ControlError> {
    let flags = open(id)?.dev_info().flags;
    Ok(if flags & sys::UBLK_F_QUIESCE as u64 == 0 {
        HandOver::NoQuiesce
    } else if flags & sys::UBLK_F_BATCH_IO as u64 != 0 {
        HandOver::BatchCommands
    } else {
        HandOver::Quiesce
    })
}

/// Asks the kernel to quiesce live device `id` for a hand-over: it holds
/// new requests, waits up to `timeout` for those in flight to be answered
/// by the running server, then ends that server's fetches (its queues stop
/// and it exits, leaving the device to the next one). The device must have
/// been added with UBLK_F_QUIESCE ([`hand_over`]); an error leaves
/// the device refusing new requests until a new server recovers it (the
/// kernel does not undo the quiesce's first step).
pub fn quiesce(id: u32, timeout: std::time::Duration) -> Result<(), ControlError> {
    let fail = |why: String| ControlError::Quiesce { id, why };
    // In a thread of its own, as `delete` (libublk's control ring is per
    // thread).
    std::thread::scope(|s| {
        s.spawn(|| {
            let ctrl = open(id)?;
            let ms = u64::try_from(timeout.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            match ctrl.quiesce_dev(ms) {
                // libublk hands an EBUSY back as a value, not an error.
                Ok(e) if e < 0 => Err(fail(std::io::Error::from_raw_os_error(-e).to_string())),
                Ok(_) => Ok(()),
                Err(e) => Err(fail(e.to_string())),
            }
        })
        .join()
        .unwrap_or_else(|_| Err(fail("the quiescing thread panicked".into())))
    })
}

/// The kernel's "interrupted, restart" code, which can surface through
/// io_uring where a syscall would have restarted.
const ERESTARTSYS: i32 = 512;

/// Waits up to 30 s for device `id` to disappear.
fn wait_gone(id: u32) -> Result<(), ControlError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while device_ids().contains(&id) {
        if std::time::Instant::now() > deadline {
            return Err(ControlError::Delete {
                id,
                why: "interrupted, and it was still there 30 s later".into(),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

/// The block node of device `id`.
pub fn bdev_path(id: u32) -> String {
    format!("/dev/ublkb{id}")
}

/// The char node of device `id`.
pub fn cdev_path(id: u32) -> String {
    format!("/dev/ublkc{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delete_whose_export_the_server_removed_first_is_a_device_going() {
        use libublk::UblkError;
        let gone = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(
            delete_answer(Err(UblkError::IOError(gone))),
            Ok(Some(-libc::ENOENT))
        );
        assert_eq!(delete_answer(Ok(0)), Ok(None));
        // libublk's way of handing back EBUSY.
        assert_eq!(delete_answer(Ok(-libc::EBUSY)), Ok(Some(-libc::EBUSY)));
        assert_eq!(
            delete_answer(Err(UblkError::UringIOError(-libc::EBUSY))),
            Ok(Some(-libc::EBUSY))
        );
        // Any other file error is a failure, said as such.
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert!(delete_answer(Err(UblkError::IOError(denied))).is_err());
        assert!(delete_answer(Err(UblkError::InvalidVal)).is_err());
    }

    #[test]
    fn a_kernel_built_without_ublk_is_told_from_one_not_loaded() {
        let root = std::env::temp_dir().join(format!("ublk-kernel-{}", std::process::id()));
        let rel = "6.1.0-57-cloud-amd64";
        std::fs::create_dir_all(root.join(format!("lib/modules/{rel}"))).unwrap();
        std::fs::create_dir_all(root.join("boot")).unwrap();
        assert_eq!(kernel_has_ublk(rel, &root), None, "nothing tells");
        std::fs::write(
            root.join(format!("lib/modules/{rel}/modules.dep")),
            "kernel/drivers/block/nbd.ko.xz:\n",
        )
        .unwrap();
        assert_eq!(kernel_has_ublk(rel, &root), Some(false));
        std::fs::write(
            root.join(format!("lib/modules/{rel}/modules.dep")),
            "kernel/drivers/block/ublk_drv.ko.xz:\n",
        )
        .unwrap();
        assert_eq!(kernel_has_ublk(rel, &root), Some(true));
        // The config, when there, decides.
        std::fs::write(
            root.join(format!("boot/config-{rel}")),
            "# CONFIG_BLK_DEV_UBLK is not set\n",
        )
        .unwrap();
        assert_eq!(kernel_has_ublk(rel, &root), Some(false));
        std::fs::write(
            root.join(format!("boot/config-{rel}")),
            "CONFIG_BLK_DEV_UBLK=m\n",
        )
        .unwrap();
        assert_eq!(kernel_has_ublk(rel, &root), Some(true));
        let _ = std::fs::remove_dir_all(&root);
        let e = ControlError::NotBuilt(rel.into()).to_string();
        assert!(e.contains("built without CONFIG_BLK_DEV_UBLK"), "{e}");
    }
}
