//! The RAM a device locks, counted before anything is allocated: its store
//! (host RAM only), its io buffers, and its processes (supervisor, server
//! and standby: heaps, thread stacks, the standby's cushion). All of it is
//! locked and the processes are exempt from the OOM killer, so a device
//! that leaves the machine short stalls it, or the kernel panics
//! "deadlocked on memory"; `add` refuses such a device instead.

use crate::plan::Plan;
use crate::server;
use anyhow::{bail, Result};
use vramblk_config::Backend;
use vramblk_host_store::MemInfo;

/// What a device would lock, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Locked {
    /// The store's own RAM: a plain host memfd; 0 for VRAM and for hugetlb
    /// pages (a pool of their own, checked by the host store).
    pub store: u64,
    /// queues x depth x max io size.
    pub buffers: u64,
    pub processes: u64,
}

impl Locked {
    pub fn of(plan: &Plan) -> Locked {
        Locked {
            store: if plan.backend == Backend::Host && !plan.hugetlb {
                plan.size
            } else {
                0
            },
            buffers: plan.device.locked_buffer_bytes(),
            processes: server::locked_by_processes(plan.device.queues),
        }
    }

    pub fn total(&self) -> u64 {
        self.store + self.buffers + self.processes
    }
}

/// Refuses a device whose locked memory would leave less than the
/// machine's margin available, with the figures and how to shrink them.
pub fn check(plan: &Plan, mem: &MemInfo) -> Result<()> {
    let locked = Locked::of(plan);
    if locked.total() + mem.margin() <= mem.mem_available {
        return Ok(());
    }
    let mib = |b: u64| b.div_ceil(1 << 20);
    let store = if locked.store > 0 {
        format!("store {} MiB, ", mib(locked.store))
    } else {
        String::new()
    };
    bail!(
        "not enough RAM for this device: it would lock {} MiB ({store}io buffers {} MiB = {} queues \
         x depth {} x {} KiB, its processes about {} MiB), but only {} MiB is available and {} MiB \
         must stay free; shrink the io buffers with --depth or --queues{}",
        mib(locked.total()),
        mib(locked.buffers),
        plan.device.queues,
        plan.device.depth,
        plan.device.max_io_bytes >> 10,
        mib(locked.processes),
        mem.mem_available >> 20,
        mib(mem.margin()),
        if locked.store > 0 {
            ", or the size (--hugepages takes the store out of RAM)"
        } else {
            ""
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use vramblk_config::CopyMode;
    use vramblk_ublk_target::DeviceOptions;

    const M: u64 = 1 << 20;

    fn plan(backend: Backend, hugetlb: bool, size: u64, queues: u16, depth: u16) -> Plan {
        Plan {
            size,
            backend,
            hugetlb,
            gpu: 0,
            reserve: 0,
            copy_mode: CopyMode::Auto,
            integrity: None,
            compress: Default::default(),
            device: DeviceOptions {
                id: -1,
                queues,
                depth,
                max_io_bytes: 512 << 10,
                io_commands: Default::default(),
            },
            log: PathBuf::from("-"),
            origin: None,
            place: None,
        }
    }

    /// A 1 GiB machine with 256 huge pages: what the guest had.
    fn small_machine(available: u64) -> MemInfo {
        MemInfo {
            mem_total: 985 * M,
            mem_available: available,
            huge_pages_free: 256,
            huge_page_size: 2 * M,
        }
    }

    #[test]
    fn counts_store_buffers_and_processes() {
        let host = Locked::of(&plan(Backend::Host, false, 128 * M, 2, 128));
        assert_eq!(host.store, 128 * M);
        assert_eq!(host.buffers, 128 * M, "2 x 128 x 512 KiB");
        assert!(host.processes > 16 * M, "{host:?}");
        assert_eq!(host.total(), host.store + host.buffers + host.processes);
        let huge = Locked::of(&plan(Backend::Host, true, 512 * M, 2, 128));
        assert_eq!(huge.store, 0, "hugetlb pages are a pool of their own");
        let vram = Locked::of(&plan(Backend::Cuda, false, 8 << 30, 4, 64));
        assert_eq!(vram.store, 0);
        assert_eq!(vram.buffers, 128 * M);
        assert!(vram.processes > host.processes, "more queues, more stacks");
    }

    #[test]
    fn refuses_what_would_leave_the_machine_short_with_the_figures() {
        // A 128M host device with 2 x 128 io buffers in a 1 GiB guest with
        // 350 MiB available: the shape that panicked "deadlocked on memory".
        let p = plan(Backend::Host, false, 128 * M, 2, 128);
        let e = check(&p, &small_machine(350 * M)).unwrap_err().to_string();
        assert!(
            e.contains("store 128 MiB, io buffers 128 MiB = 2 queues x depth 128 x 512 KiB"),
            "{e}"
        );
        assert!(
            e.contains("only 350 MiB is available and 84 MiB must stay free"),
            "{e}"
        );
        assert!(e.contains("--depth or --queues"), "{e}");
        // Smaller buffers fit.
        let p = plan(Backend::Host, false, 128 * M, 2, 32);
        assert!(check(&p, &small_machine(350 * M)).is_ok());
        // The exact edge: locked + margin == available passes, a byte less fails.
        let m = small_machine(0);
        let need = Locked::of(&p).total() + m.margin();
        assert!(check(&p, &small_machine(need)).is_ok());
        assert!(check(&p, &small_machine(need - 1)).is_err());
        // hugetlb and VRAM stores count their buffers and processes only.
        let e = check(
            &plan(Backend::Cuda, false, 8 << 30, 2, 128),
            &small_machine(200 * M),
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("store"), "{e}");
        assert!(!e.contains("--hugepages"), "{e}");
        assert!(check(
            &plan(Backend::Host, true, 512 * M, 2, 64),
            &small_machine(300 * M)
        )
        .is_ok());
    }
}
