//! systemd's readiness protocol (sd_notify): one datagram to
//! $NOTIFY_SOCKET. A few lines, so no libsystemd binding.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. "READY=1\nSTATUS=2 devices up") when running under
/// systemd with Type=notify; does nothing otherwise. Failures are logged,
/// never fatal: the devices serve either way.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match socket_addr(&path) {
        Ok(a) => a,
        Err(e) => {
            log::warn!("NOTIFY_SOCKET {path:?}: {e}");
            return;
        }
    };
    let sent = UnixDatagram::unbound().and_then(|s| s.send_to_addr(state.as_bytes(), &addr));
    if let Err(e) = sent {
        log::warn!("telling systemd {state:?}: {e}");
    }
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
        let addr = socket_addr(path.to_str().unwrap()).unwrap();
        UnixDatagram::unbound()
            .unwrap()
            .send_to_addr(b"READY=1", &addr)
            .unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_file(&path);
        assert!(socket_addr("@vramblk-test").is_ok());
    }
}
