//! Freeing a device stranded by a server that died inside its own recovery,
//! on kernels before ublk's recovery rework (Debian's 6.12 among them).
//!
//! START_USER_RECOVERY forgets which process mapped the device's command
//! buffers and counts no queue ready; each queue then counts ready once
//! every tag of it has fetched. A server killed after its START and its
//! mappings but before any queue was ready leaves the kernel counting no
//! queue ready, which makes the next START fail (EINVAL), and remembering
//! the dead process as the one whose mappings it accepts, which makes every
//! later server's mapping fail (EINVAL): the device can no longer be served
//! (seen in the crash boot on 6.12.118, 2026-12-04, a crash storm on a swap
//! device; docs/design.md). What the kernel does not check is who fetches:
//! a fetch needs no mapping. So a thread of this process fetches every tag
//! of every queue without mapping anything, which makes every queue ready;
//! lets go of those fetches (its ring's end cancels them, then the device
//! file closes) and ends; and a START then succeeds and forgets the dead
//! process's mappings. The device stays quiesced throughout (nothing is dispatched
//! before END_USER_RECOVERY, which this never sends), so the fetches'
//! buffer address is never used: it names a mapping that cannot be read
//! or written, which would turn a use into an error, not a corruption.
//!
//! It needs the dead server to have fetched no tag (a fetched tag cannot
//! be fetched again): a queue's fetches go to the kernel in one submission,
//! and gate.rs has every queue submit together, so a server dead before a
//! queue counted ready fetched nothing on any.

use libublk::sys;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// How long the dead server's device file may take to close (its io_uring
/// is torn down after the process is gone).
const OPEN_WAIT: Duration = Duration::from_secs(30);

/// The shape of the device to free, from its control.
#[derive(Clone, Debug)]
pub(crate) struct Shape {
    /// Its char device (`/dev/ublkcN`).
    pub(crate) cdev: String,
    pub(crate) queues: u16,
    pub(crate) depth: u16,
    pub(crate) flags: u64,
}

/// One tag's fetch command as the kernel reads it (`struct
/// ublksrv_io_cmd`).
fn fetch_cmd(queue: u16, tag: u16, addr: u64) -> [u8; 16] {
    let mut cmd = [0u8; 16];
    cmd[0..2].copy_from_slice(&queue.to_ne_bytes());
    cmd[2..4].copy_from_slice(&tag.to_ne_bytes());
    cmd[4..8].copy_from_slice(&(-1i32).to_ne_bytes());
    cmd[8..16].copy_from_slice(&addr.to_ne_bytes());
    cmd
}

/// The fetch command's code for a device with `flags`.
fn fetch_op(flags: u64) -> u32 {
    if flags & sys::UBLK_F_CMD_IOCTL_ENCODE as u64 != 0 {
        sys::UBLK_U_IO_FETCH_REQ
    } else {
        sys::UBLK_IO_FETCH_REQ
    }
}

/// A mapping no access is allowed to, unmapped when dropped.
struct Inaccessible {
    at: *mut libc::c_void,
    len: usize,
}

impl Inaccessible {
    fn new(len: usize) -> std::io::Result<Inaccessible> {
        // SAFETY: a fresh private mapping, touched by nobody.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Inaccessible { at, len })
    }
}

impl Drop for Inaccessible {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.at, self.len) };
    }
}

/// Opens the device file, waiting up to [`OPEN_WAIT`] while the dead
/// server's copy is still open (EBUSY).
fn open_device(path: &str) -> std::io::Result<OwnedFd> {
    let deadline = Instant::now() + OPEN_WAIT;
    loop {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            Ok(f) => return Ok(f.into()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Makes every queue of the device count ready by fetching each tag from
/// a thread of its own, then lets go of the fetches; returns once that
/// thread has ended. The kernel takes the thread that made a queue ready
/// for the queue's server, and the next START expects that server to be
/// exiting (else it warns, WARN_ON_ONCE in `ublk_queue_reinit`, which
/// taints the kernel): an ended thread is. Err: why it could not (the
/// device is then as it was, or, if some fetch failed after others took,
/// no worse: it could not be recovered either way).
pub(crate) fn free(shape: Shape, max_io_bytes: u32) -> Result<(), String> {
    std::thread::Builder::new()
        .name("ublk-free".into())
        // It holds a ring and a few locals: a small stack, since this runs
        // while memory may be short.
        .stack_size(256 << 10)
        .spawn(move || fetch_every_tag(shape, max_io_bytes))
        .map_err(|e| format!("starting its thread: {e}"))?
        .join()
        .unwrap_or_else(|_| Err("its thread panicked".into()))
}

/// What [`free`]'s thread does.
fn fetch_every_tag(shape: Shape, max_io_bytes: u32) -> Result<(), String> {
    let fd = open_device(&shape.cdev).map_err(|e| format!("opening its device file: {e}"))?;
    let nowhere = Inaccessible::new(max_io_bytes.max(4096) as usize)
        .map_err(|e| format!("mapping an address for the fetches: {e}"))?;
    let addr = if shape.flags & sys::UBLK_F_USER_COPY as u64 != 0 {
        0
    } else {
        nowhere.at as u64
    };
    let total = usize::from(shape.queues) * usize::from(shape.depth);
    let entries = (total as u32).next_power_of_two().clamp(8, 4096);
    let mut ring = io_uring::IoUring::new(entries).map_err(|e| format!("its io_uring: {e}"))?;
    let op = fetch_op(shape.flags);
    let mut failed = None;
    for q in 0..shape.queues {
        for tag in 0..shape.depth {
            let sqe = io_uring::opcode::UringCmd16::new(io_uring::types::Fd(fd.as_raw_fd()), op)
                .cmd(fetch_cmd(q, tag, addr))
                .build()
                .user_data((u64::from(q) << 16) | u64::from(tag));
            // SAFETY: the command carries only values; the fd and the
            // address outlive the ring (both are dropped after it).
            while unsafe { ring.submission().push(&sqe) }.is_err() {
                ring.submit()
                    .map_err(|e| format!("submitting fetches: {e}"))?;
            }
        }
    }
    ring.submit()
        .map_err(|e| format!("submitting fetches: {e}"))?;
    // A fetch the kernel takes stays in flight; one it refuses completes
    // at once, with the error.
    for cqe in ring.completion() {
        if cqe.result() < 0 && failed.is_none() {
            failed = Some((cqe.user_data(), cqe.result()));
        }
    }
    // The ring's end cancels the fetches, then the device file closes.
    drop(ring);
    drop(fd);
    drop(nowhere);
    match failed {
        None => Ok(()),
        Some((data, e)) => Err(format!(
            "the fetch of tag {} of queue {} failed: {}",
            data & 0xffff,
            data >> 16,
            std::io::Error::from_raw_os_error(-e)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetch_command_is_laid_out_as_the_kernels_struct() {
        let cmd = fetch_cmd(3, 17, 0x1122_3344_5566_7788);
        assert_eq!(u16::from_ne_bytes([cmd[0], cmd[1]]), 3);
        assert_eq!(u16::from_ne_bytes([cmd[2], cmd[3]]), 17);
        assert_eq!(i32::from_ne_bytes([cmd[4], cmd[5], cmd[6], cmd[7]]), -1);
        assert_eq!(
            u64::from_ne_bytes(cmd[8..16].try_into().unwrap()),
            0x1122_3344_5566_7788
        );
        assert_eq!(std::mem::size_of::<sys::ublksrv_io_cmd>(), cmd.len());
    }

    #[test]
    fn the_fetch_code_follows_the_devices_encoding() {
        assert_eq!(fetch_op(0), sys::UBLK_IO_FETCH_REQ);
        assert_eq!(
            fetch_op(sys::UBLK_F_CMD_IOCTL_ENCODE as u64),
            sys::UBLK_U_IO_FETCH_REQ
        );
    }

    #[test]
    fn the_fetch_address_cannot_be_touched() {
        let n = Inaccessible::new(8192).expect("mapping");
        assert!(!n.at.is_null());
    }
}
