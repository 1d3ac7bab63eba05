//! Upgrading a live device to the binary now on disk, with swap left on:
//! the supervisor (asked by `vramblk upgrade`, signals.rs) re-executes
//! that binary in place. The pid, the children and the memory fds survive
//! `execve`; what the new image needs besides (which device, which child
//! serves it, which fd holds what) travels as one argument, a
//! [`ResumeState`]. The new image forks a standby of its own and, once it
//! is ready, hands it the device: where the kernel has UBLK_F_QUIESCE
//! (6.16+) the standby quiesces the device, so the old server answers what
//! it holds and lets go; elsewhere the old server is killed and the
//! kernel requeues what was in flight. The standby then recovers the
//! device as after a crash, so no request fails and no page is lost
//! (supervise.rs, server.rs).

use crate::memory::{HeldVram, Memory};
use anyhow::{anyhow, bail, Context, Result};
use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use vramblk_host_store::HostStore;

/// The hidden command a supervisor re-executes itself as.
pub const RESUME_COMMAND: &str = "resume-supervisor";

/// What a re-executed supervisor must know: the device, its live server,
/// the restart count, the VRAM floor the plan kept, and the fds (inherited
/// across execve) that hold the device's memory.
#[derive(Debug, PartialEq, Eq)]
pub struct ResumeState {
    pub id: u32,
    pub server: libc::pid_t,
    pub restarts: u32,
    pub reserve: u64,
    pub memory: MemoryFds,
    /// The server lets go of a quiesced device without stopping it, so
    /// the new binary may quiesce it (`quiesce=1`; a binary before that
    /// writes nothing, and its server, which stops a device whose queues
    /// end, is killed instead).
    pub server_lets_go: bool,
}

/// The fds behind the device's memory, by number.
#[derive(Debug, PartialEq, Eq)]
pub enum MemoryFds {
    /// The host store's memfd and its size.
    Host { size: u64, memfd: RawFd },
    /// The VRAM chunks (length, fd) in mapping order, the device size, and
    /// both ends of the socket servers hand VRAM changes over on.
    Cuda {
        size: u64,
        chunks: Vec<(usize, RawFd)>,
        handoff: (RawFd, RawFd),
    },
}

impl ResumeState {
    /// The state of a supervisor holding `memory`; fails while a cuda
    /// device's VRAM is still its first server's alone (a new server would
    /// not find it).
    pub fn new(
        id: u32,
        server: libc::pid_t,
        restarts: u32,
        reserve: u64,
        memory: &Memory,
    ) -> Result<ResumeState> {
        let memory = match memory {
            Memory::Host(store) => MemoryFds::Host {
                size: vramblk_store::Store::size(store.as_ref()),
                memfd: store
                    .backing_fds()
                    .first()
                    .map(AsRawFd::as_raw_fd)
                    .ok_or_else(|| anyhow!("the host store has no memfd"))?,
            },
            Memory::Cuda { vram: None, .. } => {
                bail!("its VRAM is still held by its first server alone, so a new one would not find it")
            }
            Memory::Cuda {
                vram: Some(v),
                sockets,
            } => MemoryFds::Cuda {
                size: v.size,
                chunks: v.chunks.iter().map(|(l, f)| (*l, f.as_raw_fd())).collect(),
                handoff: (sockets.0.as_raw_fd(), sockets.1.as_raw_fd()),
            },
        };
        Ok(ResumeState {
            id,
            server,
            restarts,
            reserve,
            memory,
            // This binary's servers (its own, forked before it re-executes)
            // leave a quiesced device alone (device.rs, Served::LeftLive).
            server_lets_go: true,
        })
    }

    fn fds(&self) -> Vec<RawFd> {
        match &self.memory {
            MemoryFds::Host { memfd, .. } => vec![*memfd],
            MemoryFds::Cuda {
                chunks, handoff, ..
            } => chunks
                .iter()
                .map(|(_, fd)| *fd)
                .chain([handoff.0, handoff.1])
                .collect(),
        }
    }
}

/// `id=0 server=812 restarts=3 reserve=0 [quiesce=1] host=SIZE@FD` or
/// `... cuda=SIZE:LEN@FD,LEN@FD handoff=FD,FD`.
impl fmt::Display for ResumeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "id={} server={} restarts={} reserve={}",
            self.id, self.server, self.restarts, self.reserve
        )?;
        if self.server_lets_go {
            write!(f, " quiesce=1")?;
        }
        match &self.memory {
            MemoryFds::Host { size, memfd } => write!(f, " host={size}@{memfd}"),
            MemoryFds::Cuda {
                size,
                chunks,
                handoff,
            } => {
                let chunks: Vec<String> =
                    chunks.iter().map(|(l, fd)| format!("{l}@{fd}")).collect();
                write!(
                    f,
                    " cuda={size}:{} handoff={},{}",
                    chunks.join(","),
                    handoff.0,
                    handoff.1
                )
            }
        }
    }
}

impl FromStr for ResumeState {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<ResumeState> {
        let mut fields = std::collections::BTreeMap::new();
        for word in text.split_whitespace() {
            let (k, v) = word
                .split_once('=')
                .ok_or_else(|| anyhow!("{word:?} is not key=value"))?;
            fields.insert(k, v);
        }
        let get = |k: &str| {
            fields
                .get(k)
                .copied()
                .ok_or_else(|| anyhow!("no {k}= in {text:?}"))
        };
        fn num<T: FromStr>(what: &str, v: &str) -> Result<T> {
            v.parse().map_err(|_| anyhow!("bad {what} {v:?}"))
        }
        fn sized(v: &str) -> Result<(u64, RawFd)> {
            let (a, b) = v
                .split_once('@')
                .ok_or_else(|| anyhow!("{v:?} is not LEN@FD"))?;
            Ok((num("length", a)?, num("fd", b)?))
        }
        let memory = match (fields.get("host"), fields.get("cuda")) {
            (Some(h), None) => {
                let (size, memfd) = sized(h)?;
                MemoryFds::Host { size, memfd }
            }
            (None, Some(c)) => {
                let (size, list) = c
                    .split_once(':')
                    .ok_or_else(|| anyhow!("cuda={c:?} is not SIZE:CHUNKS"))?;
                let chunks = list
                    .split(',')
                    .map(|c| sized(c).map(|(l, fd)| (l as usize, fd)))
                    .collect::<Result<Vec<_>>>()?;
                let (a, b) = get("handoff")?
                    .split_once(',')
                    .ok_or_else(|| anyhow!("handoff= is not FD,FD"))?;
                MemoryFds::Cuda {
                    size: num("size", size)?,
                    chunks,
                    handoff: (num("fd", a)?, num("fd", b)?),
                }
            }
            _ => bail!("{text:?} names neither host= nor cuda= memory"),
        };
        Ok(ResumeState {
            id: num("id", get("id")?)?,
            server: num("server", get("server")?)?,
            restarts: num("restarts", get("restarts")?)?,
            reserve: num("reserve", get("reserve")?)?,
            memory,
            server_lets_go: fields.get("quiesce") == Some(&"1"),
        })
    }
}

/// The path this binary was started from, also after it was replaced or
/// removed there (the kernel then adds " (deleted)" to the link).
pub fn binary_path() -> Result<PathBuf> {
    exe_path("/proc/self/exe").context("reading /proc/self/exe")
}

/// What the kernel adds to an exe link whose file was replaced or removed.
const DELETED: &str = " (deleted)";

/// The path an exe link (`/proc/PID/exe`) names, " (deleted)" left off.
pub fn exe_path(link: &str) -> Option<PathBuf> {
    std::fs::read_link(link).ok().map(|l| strip_deleted(&l))
}

fn strip_deleted(link: &Path) -> PathBuf {
    let text = link.to_string_lossy();
    PathBuf::from(text.strip_suffix(DELETED).unwrap_or(&text))
}

/// This binary's version and path, for the logs.
pub fn describe_binary() -> String {
    let path = binary_path().map_or_else(|_| "?".into(), |p| p.display().to_string());
    format!("vramblk {} ({path})", env!("CARGO_PKG_VERSION"))
}

/// Whether process `pid` runs a binary that has since been replaced or
/// removed on disk: what an upgrade is for.
pub fn runs_replaced_binary(pid: u32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .is_ok_and(|l| l.to_string_lossy().ends_with(DELETED))
}

/// The binary at the path this one was started from, if a file is there.
pub fn binary_on_disk() -> Result<PathBuf> {
    let path = binary_path()?;
    if !path.is_file() {
        bail!("{} is gone", path.display());
    }
    Ok(path)
}

/// In a supervisor: replaces this process's image with the binary now at
/// the path it was started from, as `vramblk resume-supervisor STATE`,
/// the memory fds left open across execve. Returns only on failure, with
/// the fds closed on exec again.
pub fn re_execute(state: &ResumeState, run_dir: &Path) -> anyhow::Error {
    let fds = state.fds();
    let exec = || -> Result<std::convert::Infallible> {
        let path = binary_on_disk()?;
        for &fd in &fds {
            set_cloexec(fd, false)?;
        }
        log::info!(
            "supervisor: re-executing {} to hand device {} to it",
            path.display(),
            state.id
        );
        Err(std::process::Command::new(&path)
            .arg0("vramblk")
            .arg(RESUME_COMMAND)
            .arg("--run-dir")
            .arg(run_dir)
            .arg(state.to_string())
            .exec())
        .with_context(|| format!("executing {}", path.display()))
    };
    let Err(e) = exec();
    for &fd in &fds {
        let _ = set_cloexec(fd, true);
    }
    e
}

/// In `vramblk service`: replaces this process's image with the binary now
/// at its path, run with the same arguments, handing it the memory fds the
/// service holds as systemd hands a restarted service its fd store
/// (LISTEN_FDS from fd 3 on, LISTEN_FDNAMES, LISTEN_PID this pid): the new
/// image starts as after a restart, finds every supervisor alive and adopts
/// nothing. Returns only on failure, when the fds at 3 and above may have
/// been moved: the caller must exit then (systemd restarts the service,
/// which gets the fds back from its store). `path`: from [`binary_on_disk`].
pub fn re_execute_service(path: &Path, held: &[(String, RawFd)]) -> anyhow::Error {
    let exec = || -> Result<std::convert::Infallible> {
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        // First every fd above the range they go to, so that placing one
        // never closes another.
        let floor = 3 + held.len() as RawFd;
        let mut moved = Vec::with_capacity(held.len());
        for (_, fd) in held {
            // SAFETY: a descriptor the holder owns, borrowed for one fcntl.
            let fd = unsafe { BorrowedFd::borrow_raw(*fd) };
            let high = rustix::io::fcntl_dupfd_cloexec(fd, floor)
                .map_err(|e| anyhow!("duplicating a held fd: {e}"))?;
            moved.push(high);
        }
        for (i, high) in moved.iter().enumerate() {
            // libc: rustix's dup2 wants the target as an OwnedFd, and fd
            // 3 + i may be no open fd at all.
            // SAFETY: dup2 onto a number in the LISTEN_FDS range; what was
            // there (close-on-exec fds of this process's) is closed, and
            // this process executes or exits next.
            if unsafe { libc::dup2(high.as_raw_fd(), 3 + i as RawFd) } < 0 {
                bail!("dup2: {}", std::io::Error::last_os_error());
            }
        }
        drop(moved);
        let names: Vec<&str> = held.iter().map(|(n, _)| n.as_str()).collect();
        log::info!(
            "service: re-executing {} with the memory of {} fds",
            path.display(),
            held.len()
        );
        Err(std::process::Command::new(path)
            .arg0("vramblk")
            .args(args)
            .env("LISTEN_PID", std::process::id().to_string())
            .env("LISTEN_FDS", held.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            .exec())
        .with_context(|| format!("executing {}", path.display()))
    };
    let Err(e) = exec();
    e
}

fn set_cloexec(fd: RawFd, on: bool) -> Result<()> {
    // SAFETY: a descriptor of this process's, borrowed for one fcntl.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let flags = if on {
        rustix::io::FdFlags::CLOEXEC
    } else {
        rustix::io::FdFlags::empty()
    };
    rustix::io::fcntl_setfd(fd, flags).map_err(|e| anyhow!("fcntl on fd {}: {e}", fd.as_raw_fd()))
}

/// Takes ownership of an fd the previous image left open, checking it is
/// one (and none of stdin, stdout, stderr).
fn inherited(fd: RawFd) -> Result<OwnedFd> {
    if fd < 3 {
        bail!("fd {fd} cannot hold device memory");
    }
    // SAFETY: only borrowed for the check; ownership follows below.
    rustix::io::fcntl_getfd(unsafe { BorrowedFd::borrow_raw(fd) })
        .map_err(|e| anyhow!("fd {fd} is not open: {e}"))?;
    // SAFETY: the previous image of this process named `fd` as the memory
    // it held; it is open (checked above), nothing in this image opened or
    // owns it, and each fd is taken once (the state lists it once).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(owned.as_raw_fd(), true)?;
    Ok(owned)
}

/// The memory the previous image held, from the fds it named.
pub(crate) fn memory_from(state: &ResumeState) -> Result<Memory> {
    let fds = state.fds();
    let mut unique = fds.clone();
    unique.sort_unstable();
    unique.dedup();
    if unique.len() != fds.len() {
        bail!("the state names an fd twice: {state}");
    }
    Ok(match &state.memory {
        MemoryFds::Host { size, memfd } => {
            Memory::Host(Arc::new(HostStore::adopt(inherited(*memfd)?, *size)?))
        }
        MemoryFds::Cuda {
            size,
            chunks,
            handoff,
        } => Memory::Cuda {
            vram: Some(HeldVram {
                size: *size,
                chunks: chunks
                    .iter()
                    .map(|&(l, fd)| inherited(fd).map(|f| (l, f)))
                    .collect::<Result<_>>()?,
            }),
            sockets: (inherited(handoff.0)?, inherited(handoff.1)?),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::tests::some_fd;

    #[test]
    fn resume_states_round_trip() {
        let host = ResumeState {
            id: 3,
            server: 812,
            restarts: 2,
            reserve: 0,
            memory: MemoryFds::Host {
                size: 1 << 30,
                memfd: 7,
            },
            server_lets_go: true,
        };
        assert_eq!(
            host.to_string(),
            "id=3 server=812 restarts=2 reserve=0 quiesce=1 host=1073741824@7"
        );
        assert_eq!(host.to_string().parse::<ResumeState>().unwrap(), host);
        // What a binary from before quiesced hand-overs writes: its server
        // would stop a quiesced device, so it is not quiesced.
        let old = "id=3 server=812 restarts=2 reserve=0 host=1073741824@7"
            .parse::<ResumeState>()
            .unwrap();
        assert!(!old.server_lets_go);
        assert_eq!(old.to_string().parse::<ResumeState>().unwrap(), old);
        let cuda = ResumeState {
            id: 0,
            server: 9,
            restarts: 0,
            reserve: 1 << 29,
            memory: MemoryFds::Cuda {
                size: 3 << 29,
                chunks: vec![(1 << 29, 5), (1 << 29, 6), (1 << 29, 8)],
                handoff: (10, 11),
            },
            server_lets_go: false,
        };
        assert_eq!(cuda.to_string().parse::<ResumeState>().unwrap(), cuda);
        assert_eq!(cuda.fds(), vec![5, 6, 8, 10, 11]);
    }

    #[test]
    fn bad_states_are_refused_with_the_reason() {
        for (text, why) in [
            (
                "id=1 server=2 restarts=0 reserve=0",
                "neither host= nor cuda=",
            ),
            ("id=1 server=2 restarts=0 host=1@4", "no reserve="),
            ("id=x server=2 restarts=0 reserve=0 host=1@4", "bad id"),
            (
                "id=1 server=2 restarts=0 reserve=0 host=14",
                "is not LEN@FD",
            ),
            (
                "id=1 server=2 restarts=0 reserve=0 cuda=1:1@4",
                "no handoff=",
            ),
            (
                "id=1 server=2 restarts=0 reserve=0 host",
                "is not key=value",
            ),
        ] {
            let e = text.parse::<ResumeState>().unwrap_err().to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn inherited_fds_are_checked() {
        assert!(inherited(1).is_err(), "stdout is never device memory");
        assert!(inherited(100_000).is_err(), "not open");
        let fd = some_fd();
        let n = fd.as_raw_fd();
        // Hand the number over as an exec would; `inherited` owns it now.
        std::mem::forget(fd);
        let owned = inherited(n).unwrap();
        let flags = rustix::io::fcntl_getfd(&owned).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
    }

    #[test]
    fn an_fd_named_twice_is_refused() {
        let state = ResumeState {
            id: 0,
            server: 1,
            restarts: 0,
            reserve: 0,
            memory: MemoryFds::Cuda {
                size: 1 << 29,
                chunks: vec![(1 << 29, 5)],
                handoff: (5, 6),
            },
            server_lets_go: true,
        };
        let e = memory_from(&state).err().unwrap().to_string();
        assert!(e.contains("names an fd twice"), "{e}");
    }

    #[test]
    fn the_deleted_mark_is_dropped_from_the_path() {
        assert_eq!(
            strip_deleted(Path::new("/usr/bin/vramblk (deleted)")),
            PathBuf::from("/usr/bin/vramblk")
        );
        assert_eq!(
            strip_deleted(Path::new("/usr/bin/vramblk")),
            PathBuf::from("/usr/bin/vramblk")
        );
        assert!(!runs_replaced_binary(crate::host::own_pid()));
    }
}
