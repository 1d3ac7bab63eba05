//! Adopting a device whose supervisor died, from the memory fds the
//! service holds: what is left of the old server goes, and a new
//! supervisor recovers the device through ublk's user recovery.

use crate::host::pid_alive;
use crate::memory::{HeldVram, Memory};
use crate::plan::Plan;
use crate::{process, supervise};
use anyhow::{anyhow, bail, Context, Result};
use std::os::fd::{OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vramblk_config::{defaults, Backend, DeviceRecord};
use vramblk_host_store::HostStore;
use vramblk_store::handoff;
use vramblk_ublk_target::control::device_info;
use vramblk_ublk_target::{DeviceOptions, DeviceState};

/// How long an orphaned server gets to die once killed.
const ORPHAN_EXIT: Duration = Duration::from_secs(10);

/// The plan a new supervisor serves an existing device with: its shape
/// from the record the last server wrote.
pub(crate) fn adoption_plan(record: &DeviceRecord) -> Plan {
    Plan {
        size: record.size,
        backend: record.backend,
        hugetlb: false,
        gpu: record.gpu.unwrap_or(0),
        reserve: 0,
        copy_mode: record.copy_mode,
        integrity: Some(record.integrity),
        device: DeviceOptions {
            id: record.id as i32,
            queues: record.queues,
            depth: record.depth,
            max_io_bytes: defaults::MAX_IO_BYTES,
        },
        log: record.log.clone(),
        origin: record.origin,
    }
}

/// Kills what is left of the device's last server (it would keep the
/// queues), then forks a supervisor that recovers the device from copies
/// of `fds`; returns once the device is live again.
/// `close_in_child`: the service's fds the new supervisor closes at once.
pub fn adopt_device(
    run_dir: &Path,
    record: &DeviceRecord,
    fds: &[OwnedFd],
    close_in_child: &[RawFd],
) -> Result<()> {
    if record.backend == Backend::Host && fds.len() != 1 {
        bail!("a host device is one memfd, but {} fds are held", fds.len());
    }
    if record.backend == Backend::Cuda && record.backing.len() != fds.len() {
        bail!(
            "the record lists {} VRAM chunks, but {} fds are held",
            record.backing.len(),
            fds.len()
        );
    }
    end_orphaned_server(record.pid)?;
    let copies = fds
        .iter()
        .map(|f| f.try_clone())
        .collect::<std::io::Result<Vec<OwnedFd>>>()
        .context("duplicating the held fds")?;
    let plan = adoption_plan(record);
    let backing = record.backing.clone();
    let (id, restarts) = (record.id, record.restarts + 1);
    process::spawn(&plan.log, close_in_child, |reporter| {
        let memory = match plan.backend {
            Backend::Host => {
                let fd = copies
                    .into_iter()
                    .next()
                    .ok_or_else(|| anyhow!("no memfd"))?;
                Memory::Host(Arc::new(HostStore::adopt(fd, plan.size)?))
            }
            Backend::Cuda => Memory::Cuda {
                vram: Some(HeldVram {
                    size: plan.size,
                    chunks: backing.iter().map(|&l| l as usize).zip(copies).collect(),
                }),
                sockets: handoff::socket_pair()?,
            },
        };
        supervise::adopt(&plan, run_dir, reporter, memory, id, restarts)
    })
    .map(|_| ())
}

/// SIGKILLs a server whose supervisor died, if it still runs, and waits
/// for it to go (the device's queues are free for a new server then).
fn end_orphaned_server(pid: u32) -> Result<()> {
    if !pid_alive(pid) || !is_vramblk(pid) {
        return Ok(());
    }
    log::warn!("service: killing the orphaned server {pid} so a supervised one takes over");
    // A pid that runs our own binary (checked above).
    crate::host::send_signal(pid, rustix::process::Signal::KILL);
    let until = Instant::now() + ORPHAN_EXIT;
    while pid_alive(pid) {
        if Instant::now() > until {
            bail!("the orphaned server {pid} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Whether the device is live (a server, maybe an orphaned one, serves it).
pub fn still_served(id: u32) -> bool {
    device_info(id).is_ok_and(|i| i.state == DeviceState::Live)
}

/// Whether `pid` runs vramblk: the same binary as this process, also when
/// one of the two was replaced on disk since (an upgrade).
fn is_vramblk(pid: u32) -> bool {
    let exe = |p: &str| {
        std::fs::read_link(p).ok().map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_suffix(" (deleted)")
                .map(str::to_string)
                .unwrap_or(l)
        })
    };
    matches!((exe(&format!("/proc/{pid}/exe")), exe("/proc/self/exe")), (Some(a), Some(b)) if a == b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adoption_plan_keeps_the_device_shape() {
        let record = DeviceRecord {
            id: 4,
            size: 1 << 30,
            backend: Backend::Cuda,
            store: "cuda".into(),
            gpu: Some(1),
            queues: 3,
            depth: 64,
            pid: 10,
            log: "/run/vramblk/x.log".into(),
            holder_pid: Some(9),
            restarts: 0,
            origin: Some(2),
            live_since: None,
            backing: vec![1 << 29, 1 << 29],
            copy_mode: vramblk_config::CopyMode::Dma,
            integrity: true,
        };
        let plan = adoption_plan(&record);
        assert_eq!(plan.device.id, 4);
        assert_eq!((plan.device.queues, plan.device.depth), (3, 64));
        assert_eq!((plan.gpu, plan.origin), (1, Some(2)));
        assert_eq!(plan.copy_mode, vramblk_config::CopyMode::Dma);
        assert_eq!(plan.integrity, Some(true), "the layout the record names");
    }
}
