//! What a supervisor holds for its servers, so a device's data outlives
//! any one server: the device's memory and the queues' io buffers.

use crate::plan::Plan;
use anyhow::{bail, Result};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use vramblk_config::Backend;
use vramblk_cuda_store::CudaStore;
use vramblk_host_store::{HostStore, HostStoreOptions};
use vramblk_store::handoff;
use vramblk_ublk_target::QueueBuffers;

/// The device's memory as the supervisor holds it between servers.
pub enum Memory {
    /// Host RAM: the supervisor creates, maps and locks the memfd; each
    /// server inherits the mapping across the fork.
    Host(Arc<HostStore>),
    /// VRAM: CUDA must not run in the supervisor (it forks), so the first
    /// server allocates it and hands the exported chunks over `sockets`;
    /// from then on the supervisor holds them and later servers import
    /// them.
    Cuda {
        vram: Option<HeldVram>,
        /// (the supervisor's end, the servers' end)
        sockets: (OwnedFd, OwnedFd),
    },
}

/// VRAM chunks exported by a server: the device size and each chunk's
/// length with its fd, in mapping order.
pub struct HeldVram {
    pub size: u64,
    pub chunks: Vec<(usize, OwnedFd)>,
}

impl HeldVram {
    pub fn borrowed(&self) -> Vec<(usize, BorrowedFd<'_>)> {
        self.chunks.iter().map(|(l, f)| (*l, f.as_fd())).collect()
    }

    fn borrowed_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.chunks.iter().map(|(_, f)| f.as_fd()).collect()
    }
}

impl Memory {
    fn create(plan: &Plan) -> Result<Memory> {
        Ok(match plan.backend {
            Backend::Host => Memory::Host(Arc::new(HostStore::create(&HostStoreOptions {
                size: plan.size,
                hugetlb: plan.hugetlb,
            })?)),
            Backend::Cuda => Memory::Cuda {
                vram: None,
                sockets: handoff::socket_pair()?,
            },
        })
    }

    /// Whether a new server finds the data a dead one left.
    pub fn survives_server(&self) -> bool {
        match self {
            Memory::Host(_) => true,
            Memory::Cuda { vram, .. } => vram.is_some(),
        }
    }

    /// The fds that hold the memory, in order (none while a cuda device's
    /// first server has not handed its VRAM over).
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        match self {
            Memory::Host(store) => store.backing_fds(),
            Memory::Cuda { vram, .. } => {
                vram.as_ref().map(|v| v.borrowed_fds()).unwrap_or_default()
            }
        }
    }

    /// In the supervisor: takes a handoff waiting on the socket, if any;
    /// whether one came.
    pub fn take_handoff(&mut self) -> Result<bool> {
        let Memory::Cuda { vram, sockets } = self else {
            return Ok(false);
        };
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut p = [PollFd::new(&sockets.0, PollFlags::IN)];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        if !matches!(poll(&mut p, Some(&now)), Ok(n) if n > 0) {
            return Ok(false);
        }
        let (text, fds) = handoff::recv(sockets.0.as_fd())?;
        let held = parse_vram(&text, fds)?;
        log::info!(
            "supervisor: holding {} MiB of VRAM in {} chunks for the next server",
            held.size >> 20,
            held.chunks.len()
        );
        *vram = Some(held);
        Ok(true)
    }
}

/// In a cuda server: hands the VRAM it holds now to the supervisor, which
/// from then on holds exactly these chunks (after allocating, giving back
/// or taking back VRAM).
pub fn hand_over(store: &CudaStore, servers_end: BorrowedFd) -> Result<()> {
    let chunks = store.exported_chunks()?;
    if chunks.len() > handoff::MAX_FDS {
        bail!(
            "{} VRAM chunks are more than one handoff carries ({})",
            chunks.len(),
            handoff::MAX_FDS
        );
    }
    let mut text = format!("VRAM {}", vramblk_store::Store::size(store));
    for (len, _) in &chunks {
        text.push_str(&format!(" {len}"));
    }
    let fds: Vec<BorrowedFd> = chunks.iter().map(|(_, f)| f.as_fd()).collect();
    Ok(handoff::send(servers_end, &text, &fds)?)
}

/// `VRAM <size> <len>...` with one fd per length.
fn parse_vram(text: &str, fds: Vec<OwnedFd>) -> Result<HeldVram> {
    let mut words = text.split_whitespace();
    if words.next() != Some("VRAM") {
        bail!("unexpected handoff {text:?}");
    }
    let size: u64 = match words.next().and_then(|w| w.parse().ok()) {
        Some(s) => s,
        None => bail!("handoff without a size: {text:?}"),
    };
    let lens: Vec<usize> = words.filter_map(|w| w.parse().ok()).collect();
    if lens.len() != fds.len() || lens.is_empty() {
        bail!(
            "handoff names {} chunks but carries {} fds",
            lens.len(),
            fds.len()
        );
    }
    Ok(HeldVram {
        size,
        chunks: lens.into_iter().zip(fds).collect(),
    })
}

/// The memory and the queues' io buffers, both inherited across the fork.
pub struct Held {
    pub memory: Memory,
    pub buffers: Arc<QueueBuffers>,
}

impl Held {
    pub fn create(plan: &Plan) -> Result<Held> {
        Self::with_memory(plan, Memory::create(plan)?)
    }

    /// Io buffers for the plan beside memory that exists already.
    pub fn with_memory(plan: &Plan, memory: Memory) -> Result<Held> {
        Ok(Held {
            memory,
            buffers: Arc::new(QueueBuffers::allocate(&plan.device)?),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh memfd: an fd to hand around in tests.
    pub(crate) fn some_fd() -> OwnedFd {
        rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd_create")
    }

    #[test]
    fn handoff_text_is_checked_against_its_fds() {
        let held = parse_vram("VRAM 4096 2097152 2097152", vec![some_fd(), some_fd()]).unwrap();
        assert_eq!(held.size, 4096);
        assert_eq!(held.chunks.len(), 2);
        assert!(parse_vram("VRAM 4096 2097152", vec![some_fd(), some_fd()]).is_err());
        assert!(parse_vram("HELLO", vec![]).is_err());
        assert!(parse_vram("VRAM x 1", vec![some_fd()]).is_err());
    }
}
