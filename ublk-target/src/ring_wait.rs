//! One turn of a queue thread's ring: submit what the loop queued, then
//! wait for completions as long as the poll policy says. Both queue loops
//! (per-tag commands in queue.rs, batch commands in batch_loop.rs) turn
//! their ring this way.

use crate::poll_policy::{PollPolicy, Wait};
use io_uring::IoUring;
use libublk::UblkError;
use std::time::Duration;

/// With nothing in flight the loop sleeps in io_uring this long at a time
/// (after which the per-tag loop has libublk mark the queue idle).
pub(crate) const IDLE_SECS: u64 = 20;

/// How long the loop pauses after io_uring refused a turn for want of
/// memory.
const TRANSIENT_PAUSE: Duration = Duration::from_millis(1);

/// Whether io_uring_enter's `errno` is a turn to try again, not the end of
/// the queue: a signal (EINTR), or memory short right now (EAGAIN: no
/// request could be allocated; ENOMEM; EBUSY: completions waiting for room
/// that could not be flushed), exactly when a swap device is needed most.
pub(crate) fn transient(errno: i32) -> bool {
    matches!(
        errno,
        libc::EINTR | libc::EAGAIN | libc::ENOMEM | libc::EBUSY
    )
}

/// Submits and waits: for a completion or IDLE_SECS when the store has
/// nothing in flight (`busy` false), else as PollPolicy::SERVER says for
/// `since_progress` (spin, or nap in io_uring). Ok(true): an idle wait
/// ended with nothing to do.
pub(crate) fn turn(
    r: &mut IoUring,
    busy: bool,
    since_progress: Duration,
) -> Result<bool, UblkError> {
    let wait = if !busy {
        Some(io_uring::types::Timespec::new().sec(IDLE_SECS))
    } else {
        match PollPolicy::SERVER.wait(since_progress) {
            Wait::Nap(nap) => Some(io_uring::types::Timespec::from(nap)),
            Wait::Spin => None,
        }
    };
    let ret = match wait {
        Some(ts) => {
            let args = io_uring::types::SubmitArgs::new().timespec(&ts);
            r.submitter().submit_with_args(1, &args)
        }
        None => r.submit(),
    };
    match ret.map_err(|e| (e.raw_os_error(), e)) {
        Ok(_) => Ok(false),
        Err((Some(errno), _)) if errno == libc::ETIME => Ok(!busy),
        Err((Some(errno), _)) if transient(errno) => {
            if errno != libc::EINTR {
                // Memory is short (io_uring could not allocate a request):
                // a breath, then the next turn tries again; ending the loop
                // would leave the queue's requests, swap's among them,
                // unserved for good.
                std::thread::sleep(TRANSIENT_PAUSE);
            }
            Ok(false)
        }
        Err((_, e)) => Err(UblkError::IOError(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_short_and_signals_are_turns_to_retry_not_the_end_of_the_queue() {
        for errno in [libc::EINTR, libc::EAGAIN, libc::ENOMEM, libc::EBUSY] {
            assert!(transient(errno), "{errno}");
        }
        for errno in [
            libc::ENXIO,
            libc::EBADF,
            libc::EINVAL,
            libc::EFAULT,
            libc::EOWNERDEAD,
        ] {
            assert!(!transient(errno), "{errno}");
        }
    }
}
