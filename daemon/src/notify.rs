//! systemd's readiness protocol (sd_notify): one datagram to
//! $NOTIFY_SOCKET, with fds attached for the fd store; and the fds systemd
//! hands back at the next start (sd_listen_fds: LISTEN_FDS). A few lines
//! each, so no libsystemd binding.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. "READY=1\nSTATUS=2 devices up") when running under
/// systemd with Type=notify; does nothing otherwise. Failures are logged,
/// never fatal: the devices serve either way.
pub fn notify(state: &str) {
    if let Err(e) = notify_with_fds(state, &[]) {
        log::warn!("telling systemd {state:?}: {e}");
    }
}

/// Whether systemd listens for notifications (Type=notify).
pub fn under_systemd() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Sends `state` with `fds` attached (SCM_RIGHTS), as "FDSTORE=1" needs;
/// does nothing when not under systemd.
pub fn notify_with_fds(state: &str, fds: &[BorrowedFd]) -> std::io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    send_datagram(&path.to_string_lossy(), state, fds)
}

/// Sends `text` with `fds` attached as one datagram to the Unix socket at
/// `path` (an abstract name when it starts with '@').
pub fn send_datagram(path: &str, text: &str, fds: &[BorrowedFd]) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    sock.connect_addr(&socket_addr(path)?)?;
    vramblk_store::handoff::send(sock.as_fd(), text, fds)
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// The fds systemd passed to this process (its fd store, at a restart),
/// each with its FDNAME. Empty when none were passed, or when they were
/// meant for another process (LISTEN_PID). Call before anything else opens
/// an fd: they are 3, 4, ... The variables are removed so that children do
/// not take the fds for theirs.
pub fn listen_fds() -> Vec<(String, OwnedFd)> {
    let var = |k: &str| std::env::var(k).ok();
    let for_us = var("LISTEN_PID").and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count = var("LISTEN_FDS").and_then(|n| n.parse::<i32>().ok());
    let names = var("LISTEN_FDNAMES").unwrap_or_default();
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    let (true, Some(count)) = (for_us, count) else {
        return Vec::new();
    };
    let mut names = names.split(':');
    (0..count.clamp(0, 4096))
        .map(|i| {
            let name = names.next().unwrap_or("unknown").to_string();
            // SAFETY: systemd passed this fd to this process (LISTEN_PID)
            // and nothing here has taken it yet.
            let fd = unsafe { OwnedFd::from_raw_fd(3 + i) };
            // Not inherited by what this process forks or runs.
            let _ = rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC);
            (name, fd)
        })
        .collect()
}

/// A path, or an abstract name when it starts with '@'.
fn socket_addr(path: &str) -> std::io::Result<SocketAddr> {
    match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())
        }
        None => SocketAddr::from_pathname(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_reaches_the_socket() {
        let path = std::env::temp_dir().join(format!("vramblk-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        send_datagram(path.to_str().unwrap(), "READY=1", &[]).unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_file(&path);
        assert!(socket_addr("@vramblk-test").is_ok());
    }
}
