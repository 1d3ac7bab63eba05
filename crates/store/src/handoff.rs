//! Handing file descriptors between processes over a Unix socket
//! (SCM_RIGHTS): memory behind fds (a host store's memfd, exported
//! VRAM chunks) passed to a process that holds it while the one that
//! allocated it dies.

use crate::StoreError;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

type Result<T> = std::result::Result<T, StoreError>;

/// At most this many fds per message (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 200;
const MAX_TEXT: usize = 4096;

/// A connected pair of SOCK_SEQPACKET sockets: (supervisor's, server's).
pub fn socket_pair() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(StoreError::last_os("socketpair"));
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends `text` with `fds` attached as one message.
pub fn send(sock: BorrowedFd, text: &str, fds: &[BorrowedFd]) -> Result<()> {
    if fds.len() > MAX_FDS || text.len() > MAX_TEXT || text.is_empty() {
        return Err(StoreError::Invalid(format!(
            "a handoff message takes 1-{MAX_TEXT} bytes of text and at most {MAX_FDS} fds"
        )));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let payload = std::mem::size_of_val(raw.as_slice()) as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
    let mut control = vec![0u8; space.max(1)];
    let mut iov = libc::iovec {
        iov_base: text.as_ptr() as *mut libc::c_void,
        iov_len: text.len(),
    };
    // SAFETY: msghdr is a plain C struct; zero is a valid start.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds CMSG_SPACE(payload) bytes, so the
        // first header and its data fit; the fds are copied into it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload as usize,
            );
        }
    }
    // SAFETY: msg points at live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(StoreError::last_os("sending a handoff"));
    }
    Ok(())
}

/// The file an fd reaches, as (device, inode): two fds passed around
/// separately (dups, or sent twice) reach the same file when these match.
pub fn file_id(fd: BorrowedFd) -> Option<(u64, u64)> {
    // SAFETY: fstat into a zeroed struct on a live fd.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    (unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

/// Receives one message: its text and the fds it carried (now ours).
pub fn recv(sock: BorrowedFd) -> Result<(String, Vec<OwnedFd>)> {
    let mut text = vec![0u8; MAX_TEXT];
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) };
    let mut control = vec![0u8; space as usize];
    let mut iov = libc::iovec {
        iov_base: text.as_mut_ptr().cast(),
        iov_len: text.len(),
    };
    // SAFETY: msghdr is a plain C struct; zero is a valid start.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len() as _;
    // SAFETY: msg points at live buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(StoreError::last_os("receiving a handoff"));
    }
    if n == 0 {
        return Err(StoreError::Unavailable(
            "the other end closed the handoff socket".into(),
        ));
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into `control`;
    // every SCM_RIGHTS fd is a new descriptor of this process, owned here.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(StoreError::Invalid(format!(
            "a handoff carried more than {MAX_FDS} fds"
        )));
    }
    text.truncate(n as usize);
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
        // SAFETY: a fresh memfd with a static name; the fd is checked.
        let fd = unsafe { libc::memfd_create(c"handoff-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd was just created and is owned by nobody else.
        std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}
