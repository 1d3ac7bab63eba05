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
use vramblk_config::{Backend, DeviceRecord};
use vramblk_host_store::HostStore;
use vramblk_store::handoff;
use vramblk_ublk_target::control::device_info;
use vramblk_ublk_target::DeviceState;

/// How long an orphaned server gets to die once killed.
const ORPHAN_EXIT: Duration = Duration::from_secs(10);

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
    let plan = Plan::from_record(record);
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
    let theirs = crate::upgrade::exe_path(&format!("/proc/{pid}/exe"));
    matches!((theirs, crate::upgrade::exe_path("/proc/self/exe")), (Some(a), Some(b)) if a == b)
}
