//! The block layer's request timeout of a ublk device, which bounds how late
//! some kernels notice that its server died.
//!
//! Kernels before ublk's server-exit rework (6.15) notice a dead server
//! through its io_uring commands: each one the server left in the kernel is
//! cancelled as the server exits, and that starts the quiesce. A queue whose
//! every tag holds a request at that moment (a full queue: the normal state
//! of a swap device under pressure) has no command in the kernel, so only
//! the request timeout finds it: 30 s by default, during which the device
//! serves nothing and a recovering server waits. ublk's timeout handler only
//! re-arms the timer while the server lives, so a short timeout costs one
//! timer per request that takes longer than it, and bounds the wait.
//! Newer kernels notice the exit when the server's char device closes; the
//! setting does nothing there.

use std::path::PathBuf;
use std::time::Duration;

/// The request timeout vramblk gives its devices.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// The sysfs attribute (milliseconds) of device `id`'s request timeout.
pub(crate) fn attribute_path(id: u32) -> PathBuf {
    PathBuf::from(format!("/sys/block/ublkb{id}/queue/io_timeout"))
}

/// Sets device `id`'s request timeout to [`REQUEST_TIMEOUT`].
pub(crate) fn shorten(id: u32) -> std::io::Result<()> {
    std::fs::write(attribute_path(id), REQUEST_TIMEOUT.as_millis().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attribute_is_the_devices_queue_io_timeout_in_ms() {
        assert_eq!(
            attribute_path(3),
            PathBuf::from("/sys/block/ublkb3/queue/io_timeout")
        );
    }
}
