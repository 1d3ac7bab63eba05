//! A supervisor's side of the service's holder socket (daemon/src/holder.rs):
//! where a supervisor the service started finds the socket, and how it
//! hands the service copies of its device's memory fds.

use crate::notify::send_datagram;
use std::os::fd::BorrowedFd;
use vramblk_ublk_target::control::bdev_path;

/// Where a supervisor started by the service finds the service's socket.
pub const SOCKET_ENV: &str = "VRAMBLK_HOLDER_SOCKET";

/// Which socket a service listens on: (device, inode) of its path, new
/// each time a service binds it.
pub type SocketId = (u64, u64);

/// In a supervisor the service started: the socket the service listens
/// on now, if one does (a restarted service binds a new one, and is
/// told about the memory again).
pub fn service_socket() -> Option<SocketId> {
    use std::os::unix::fs::MetadataExt;
    let path = std::env::var_os(SOCKET_ENV)?;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino()))
}

/// In a supervisor: tells the service, when there is one, which fds hold
/// device `id`'s memory, in order. Failure is logged: the supervisor
/// still holds the memory itself.
pub fn announce(id: u32, fds: &[BorrowedFd]) {
    let Some(path) = std::env::var_os(SOCKET_ENV) else {
        return;
    };
    match send_datagram(&path.to_string_lossy(), &format!("HOLD {id}"), fds) {
        Ok(()) => log::info!(
            "supervisor: the service holds the memory of {} too ({} fds)",
            bdev_path(id),
            fds.len()
        ),
        Err(e) => log::warn!(
            "supervisor: could not hand the memory of {} to the service: {e}",
            bdev_path(id)
        ),
    }
}
