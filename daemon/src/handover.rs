//! How a standby is told to take over, and how it takes a live device from
//! the old binary's server in an upgrade.
//!
//! The supervisor wakes a standby with one eventfd write (it must allocate
//! nothing then, since swap may be waiting): the word carries the restart
//! number and, for an upgrade, the pid of the server still serving. For an
//! upgrade the standby first quiesces the device where the kernel can
//! (UBLK_F_QUIESCE, 6.16+): the kernel holds new requests, the old server
//! answers what it holds, its fetches end and it exits, leaving the device
//! to the standby (device.rs, `Served::LeftLive`), so no request is issued
//! twice. Where the device cannot be quiesced (added without QUIESCE, or
//! with batch commands: control::HandOver says why), or the quiesce
//! fails, the old server is killed and the kernel issues its requests
//! again, as after a crash; so is one that does not let go in time (by the
//! supervisor).
//! Either way the standby then recovers the device.

use rustix::process::Signal;
use std::time::Duration;
use vramblk_host_store::MemInfo;
use vramblk_ublk_target::control::{self, HandOver};

/// What a standby is told when it is woken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Go {
    /// Which restart of the device this is.
    pub restarts: u32,
    /// For an upgrade, the old binary's server, still serving.
    pub from: Option<u32>,
}

/// The eventfd word for `go`: the restart number + 1 in the low half (an
/// eventfd word is never 0), the old server's pid in the high half.
pub fn word(restarts: u32, from: Option<libc::pid_t>) -> u64 {
    let pid = from.and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
    (u64::from(pid) << 32) | (u64::from(restarts) + 1)
}

/// The word's meaning; None for 0, which no supervisor writes.
pub fn read_word(word: u64) -> Option<Go> {
    let low = (word & 0xffff_ffff) as u32;
    let restarts = low.checked_sub(1)?;
    let pid = (word >> 32) as u32;
    Some(Go {
        restarts,
        from: (pid != 0).then_some(pid),
    })
}

/// How long the old server may take to answer what it holds: its
/// requests take milliseconds; a drain that takes longer is one stalled
/// for memory, and killing it then (the kernel re-issues what it held)
/// ends the wait before the kernel warns of a stalled allocation (10 s).
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the old server may take to exit once the quiesce ended its
/// fetches: under TCG with memory exhausted, once in 18 hand-overs more
/// than 5 s and once not at all (its way out needed memory that only the
/// device, then unserved, could free), so it is killed after this.
const LET_GO_MS: i32 = 2000;

/// How long after waking the standby for a hand-over the supervisor lets
/// the old server live before it kills it (supervise.rs), should the
/// standby fail to.
pub const LET_GO_PATIENCE: Duration = Duration::from_secs(30);

/// Takes device `id` from its live server `from`: quiesced where it can
/// be and memory is not short, the server killed otherwise. Returns how,
/// for the log. Once the quiesce returns the device is unserved until this
/// server recovers it, and memory may be exhausted: nothing here allocates
/// after it (the wait for the old server's exit is a poll on a pidfd
/// opened before; the recovery's commands go through the control ring the
/// standby built while readying).
pub fn take_from(id: u32, from: u32) -> String {
    let cannot_quiesce = match control::hand_over(id).unwrap_or(HandOver::NoQuiesce) {
        HandOver::Quiesce => None,
        HandOver::NoQuiesce => Some(WITHOUT_QUIESCE),
        HandOver::BatchCommands => Some(WITH_BATCH_COMMANDS),
    };
    if let Some(how) = cannot_quiesce {
        kill(from);
        return how.into();
    }
    // With memory short, a quiesce would have the old server run (drain
    // its requests, unwind its queues) while the device holds new I/O, and
    // what it runs may wait for memory only the device can free (7.3
    // crash-stress upgrades: a 10 s allocation stall in a draining server).
    // Its requests are issued again instead, as after a crash.
    if let Some(m) = MemInfo::read().ok().filter(memory_short) {
        let how = format!(
            "killed (memory is short, {} MiB available: a quiesce would have it drain its \
             requests while the device holds new ones); its requests are issued again",
            m.mem_available >> 20
        );
        kill(from);
        return how;
    }
    let exited = rustix::process::Pid::from_raw(from as i32)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    let how = match control::quiesce(id, QUIESCE_TIMEOUT) {
        Ok(()) => {
            let [gone] = crate::process::wait_readable(&[exited.as_ref()], LET_GO_MS);
            if gone {
                return "quiesced: it answered its requests and let go".into();
            }
            // Its requests are answered and its fetches ended: killing it
            // now re-issues nothing.
            "quiesced: it answered its requests, then was killed (it had not exited 2 s later)"
        }
        Err(e) => {
            log::warn!("server: {e}; killing server {from} instead");
            "killed (the quiesce failed); its requests are issued again"
        }
    };
    kill(from);
    how.into()
}

const WITHOUT_QUIESCE: &str = "killed (the device was added without QUIESCE: kernel before \
                               6.16); its requests are issued again";

const WITH_BATCH_COMMANDS: &str = "killed (the device uses batch commands, whose quiesce lost \
                                   requests on 7.3.4); its requests are issued again";

/// Whether memory is too short for a quiesced hand-over: less available
/// than twice what must stay free for the rest of the machine.
fn memory_short(m: &MemInfo) -> bool {
    m.mem_available < 2 * m.margin()
}

fn kill(pid: u32) {
    crate::host::send_signal(pid, Signal::KILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_word_carries_restarts_and_the_old_server() {
        for (restarts, from) in [
            (0, None),
            (7, None),
            (3, Some(4_194_303)),
            (u32::MAX - 1, Some(1)),
        ] {
            let w = word(restarts, from);
            assert_ne!(w, 0, "an eventfd word of 0 wakes nobody");
            assert_eq!(
                read_word(w),
                Some(Go {
                    restarts,
                    from: from.map(|p| p as u32)
                })
            );
        }
        assert_eq!(read_word(0), None);
        // A plain take-over's word is what it was before upgrades used it.
        assert_eq!(word(4, None), 5);
    }

    #[test]
    fn a_machine_swapping_hard_is_not_quiesced() {
        let mib = |n: u64| n << 20;
        let m = |total, available| MemInfo {
            mem_total: mib(total),
            mem_available: mib(available),
            ..MemInfo::default()
        };
        // 1.25 GiB: 64 MiB + 2% = 89.6 MiB must stay free.
        assert!(!memory_short(&m(1280, 470)));
        assert!(memory_short(&m(1280, 150)));
        assert!(memory_short(&m(1280, 0)));
        // 64 GiB: 1.37 GiB must stay free.
        assert!(!memory_short(&m(65536, 8192)));
        assert!(memory_short(&m(65536, 2048)));
    }
}
