//! Handing file descriptors between processes over a Unix socket
//! (SCM_RIGHTS): memory behind fds (a host store's memfd, exported
//! VRAM chunks) passed to a process that holds it while the one that
//! allocated it dies.

use crate::StoreError;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

type Result<T> = std::result::Result<T, StoreError>;

/// At most this many fds per message (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 200;
const MAX_TEXT: usize = 4096;

fn os(what: &str, e: rustix::io::Errno) -> StoreError {
    StoreError::Os {
        what: what.into(),
        source: e.into(),
    }
}

/// A connected pair of SOCK_SEQPACKET sockets: (supervisor's, server's).
pub fn socket_pair() -> Result<(OwnedFd, OwnedFd)> {
    rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| os("socketpair", e))
}

/// Sends `text` with `fds` attached as one message.
pub fn send(sock: BorrowedFd, text: &str, fds: &[BorrowedFd]) -> Result<()> {
    if fds.len() > MAX_FDS || text.len() > MAX_TEXT || text.is_empty() {
        return Err(StoreError::Invalid(format!(
            "a handoff message takes 1-{MAX_TEXT} bytes of text and at most {MAX_FDS} fds"
        )));
    }
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(StoreError::Invalid(
            "the fds did not fit their control message".into(),
        ));
    }
    rustix::net::sendmsg(
        sock,
        &[IoSlice::new(text.as_bytes())],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map_err(|e| os("sending a handoff", e))?;
    Ok(())
}

/// The file an fd reaches, as (device, inode): two fds passed around
/// separately (dups, or sent twice) reach the same file when these match.
pub fn file_id(fd: BorrowedFd) -> Option<(u64, u64)> {
    let st = rustix::fs::fstat(fd).ok()?;
    Some((st.st_dev, st.st_ino))
}

/// Receives one message: its text and the fds it carried (now ours).
pub fn recv(sock: BorrowedFd) -> Result<(String, Vec<OwnedFd>)> {
    let mut text = vec![0u8; MAX_TEXT];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut text)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| os("receiving a handoff", e))?;
    // Every fd that arrived is ours now, also when the message is refused
    // below: collected first, so they are closed rather than leaked.
    let fds: Vec<OwnedFd> = control
        .drain()
        .flat_map(|m| match m {
            RecvAncillaryMessage::ScmRights(fds) => fds.collect(),
            _ => Vec::new(),
        })
        .collect();
    if got.bytes == 0 {
        return Err(StoreError::Unavailable(
            "the other end closed the handoff socket".into(),
        ));
    }
    if got.flags.contains(ReturnFlags::CTRUNC) {
        return Err(StoreError::Invalid(format!(
            "a handoff carried more than {MAX_FDS} fds"
        )));
    }
    text.truncate(got.bytes);
    Ok((String::from_utf8_lossy(&text).into_owned(), fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    #[test]
    fn fds_cross_the_socket_and_still_reach_the_same_file() {
        let (a, b) = socket_pair().unwrap();
        let mut files: Vec<std::fs::File> = (0..3).map(|_| tempfile()).collect();
        for (i, f) in files.iter_mut().enumerate() {
            write!(f, "chunk {i}").unwrap();
        }
        let borrowed: Vec<BorrowedFd> = files.iter().map(|f| f.as_fd()).collect();
        send(a.as_fd(), "VRAM 3 1 2 3", &borrowed).unwrap();
        drop(files);
        let (text, fds) = recv(b.as_fd()).unwrap();
        assert_eq!(text, "VRAM 3 1 2 3");
        assert_eq!(fds.len(), 3);
        for (i, fd) in fds.into_iter().enumerate() {
            let mut f = std::fs::File::from(fd);
            f.rewind().unwrap();
            let mut s = String::new();
            f.read_to_string(&mut s).unwrap();
            assert_eq!(s, format!("chunk {i}"));
        }
    }

    #[test]
    fn file_ids_match_for_dups_only() {
        let (a, b) = (tempfile(), tempfile());
        let dup = a.try_clone().unwrap();
        assert!(file_id(a.as_fd()).is_some());
        assert_eq!(file_id(a.as_fd()), file_id(dup.as_fd()));
        assert_ne!(file_id(a.as_fd()), file_id(b.as_fd()));
    }

    #[test]
    fn a_closed_peer_is_an_error_not_a_hang() {
        let (a, b) = socket_pair().unwrap();
        drop(a);
        let e = recv(b.as_fd()).unwrap_err().to_string();
        assert!(e.contains("closed"), "{e}");
    }

    fn tempfile() -> std::fs::File {
        let fd = rustix::fs::memfd_create("handoff-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        std::fs::File::from(fd)
    }

    #[test]
    fn too_many_fds_or_no_text_are_refused_before_sending() {
        let (a, _b) = socket_pair().unwrap();
        let f = tempfile();
        let many = vec![f.as_fd(); MAX_FDS + 1];
        assert!(send(a.as_fd(), "x", &many).is_err());
        assert!(send(a.as_fd(), "", &[]).is_err());
        send(a.as_fd(), "no fds", &[]).unwrap();
    }
}
