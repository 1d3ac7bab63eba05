//! `vramblk add`.

use crate::args::{AddArgs, BackendArg, CompressArg, CopyModeArg, IntegrityArg, IoCommandsArg};
use crate::{del, gpu};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use vramblk_config::{
    defaults, format_size, parse_size, parse_size_or_zero, split_by_room, Backend, Compress,
    CopyMode, DeviceRecord, GpuRoom, RUN_DIR,
};
use vramblk_daemon::budget;
use vramblk_daemon::host::{cpu_count, require_root, require_ublk_features};
use vramblk_daemon::plan::Plan;
use vramblk_daemon::process::{self, Reporter};
use vramblk_daemon::supervise::{self, Mode};
use vramblk_daemon::swap;
use vramblk_host_store::{HostStore, HostStoreOptions, MemInfo};
use vramblk_ublk_target::control::{bdev_path, device_ids};
use vramblk_ublk_target::{DeviceOptions, IoCommands};

/// The size asked, checked.
fn size_asked(a: &AddArgs) -> Result<u64> {
    let size = parse_size(&a.size).map_err(|e| anyhow!("--size: {e}"))?;
    if size % 4096 != 0 {
        bail!("--size: {size} bytes is not a multiple of 4 KiB");
    }
    Ok(size)
}

fn backend(a: &AddArgs) -> Backend {
    match a.backend {
        BackendArg::Cuda => Backend::Cuda,
        BackendArg::Host => Backend::Host,
    }
}

fn reserve(a: &AddArgs) -> Result<u64> {
    parse_size_or_zero(&a.reserve).map_err(|e| anyhow!("--reserve: {e}"))
}

/// The device's shape (id, queues, depth) as asked, checked.
fn device_options(a: &AddArgs) -> Result<DeviceOptions> {
    if a.hugepages && backend(a) != Backend::Host {
        bail!("--hugepages applies to --backend host only");
    }
    let device = DeviceOptions {
        id: a.id.map(|i| i as i32).unwrap_or(-1),
        queues: a.queues.unwrap_or_else(cpu_count),
        depth: a.depth,
        max_io_bytes: defaults::MAX_IO_BYTES,
        io_commands: match a.io_commands {
            IoCommandsArg::Auto => IoCommands::Auto,
            IoCommandsArg::PerTag => IoCommands::PerTag,
        },
    };
    device.validate()?;
    Ok(device)
}

/// The plan for one device of `size` bytes on GPU `gpu`.
fn plan(a: &AddArgs, gpu: u32, size: u64) -> Result<Plan> {
    let device = device_options(a)?;
    Ok(Plan {
        size,
        backend: backend(a),
        hugetlb: a.hugepages,
        gpu,
        reserve: reserve(a)?,
        copy_mode: match a.copy_mode {
            CopyModeArg::Auto => CopyMode::Auto,
            CopyModeArg::Dma => CopyMode::Dma,
        },
        integrity: match a.integrity {
            IntegrityArg::Auto => None,
            IntegrityArg::On => Some(true),
            IntegrityArg::Off => Some(false),
        },
        compress: match a.compress {
            CompressArg::Off => Compress::Off,
            CompressArg::Same => Compress::Same,
            CompressArg::Lz => Compress::Lz,
        },
        device,
        log: PathBuf::from("-"),
        origin: None,
        place: None,
    })
}

/// Refuses what the arguments alone say is wrong, before anything is
/// asked of the machine.
fn check_args(a: &AddArgs) -> Result<()> {
    size_asked(a)?;
    reserve(a)?;
    device_options(a)?;
    if a.compress != CompressArg::Off && backend(a) == Backend::Host {
        bail!("--compress applies to --backend cuda only (the host store keeps pages whole)");
    }
    if a.compress != CompressArg::Off && a.copy_mode == CopyModeArg::Dma {
        bail!("--compress needs --copy-mode auto: compressed pages move through the GPU's kernels");
    }
    if a.gpu.single().is_none() {
        if backend(a) == Backend::Host {
            bail!("--gpu {} applies to --backend cuda only", a.gpu);
        }
        if a.id.is_some() {
            bail!("--id names one device; --gpu {} adds one per GPU", a.gpu);
        }
        if a.foreground {
            bail!(
                "--foreground serves one device; --gpu {} adds one per GPU",
                a.gpu
            );
        }
    }
    Ok(())
}

/// One plan per device `add` makes: one, or one per GPU of --gpu, each
/// placed near its GPU. The arguments were checked (`check_args`).
fn plans(a: &AddArgs) -> Result<Vec<Plan>> {
    let size = size_asked(a)?;
    if backend(a) == Backend::Host {
        return Ok(vec![plan(a, 0, size)?]);
    }
    if let Some(gpu) = a.gpu.single() {
        let mut p = plan(a, gpu, size)?;
        place_near_gpu(&mut p, &gpu::inventory(), &a.sysfs, a.queues.is_some());
        return Ok(vec![p]);
    }
    let gpus = gpu::inventory().context("--gpu: listing the GPUs")?;
    let chosen = a
        .gpu
        .resolve(gpus.len() as u32)
        .map_err(|e| anyhow!("--gpu {}: {e}", a.gpu))?;
    let reserve = reserve(a)?;
    let rooms: Vec<GpuRoom> = chosen
        .iter()
        .map(|&g| GpuRoom {
            gpu: g,
            room: gpus[g as usize].free.saturating_sub(reserve),
        })
        .collect();
    let shares = split_by_room(size, &rooms).map_err(|e| {
        anyhow!(
            "--gpu {}: {e} ({} reserved on each)",
            a.gpu,
            format_size(reserve)
        )
    })?;
    let inventory = Ok(gpus);
    shares
        .into_iter()
        .map(|(gpu, share)| {
            let mut p = plan(a, gpu, share)?;
            p.place = place_near(gpu, &inventory, &a.sysfs);
            fit_queues(&mut p, a.queues.is_some());
            Ok(p)
        })
        .collect()
}

/// Places a cuda plan near its GPU (found in `gpus`, the GPU list), and
/// unless the queues were asked for, gives it one queue per CPU it will
/// run on.
pub fn place_near_gpu(
    plan: &mut Plan,
    gpus: &Result<Vec<gpu::GpuEntry>>,
    sysfs: &Path,
    queues_asked: bool,
) {
    if plan.backend == Backend::Cuda && plan.place.is_none() {
        plan.place = place_near(plan.gpu, gpus, sysfs);
        fit_queues(plan, queues_asked);
    }
}

/// One queue per CPU the device is pinned to (the default is one per CPU
/// of the machine, which a pinned device's threads would crowd).
fn fit_queues(plan: &mut Plan, queues_asked: bool) {
    if queues_asked {
        return;
    }
    if let Some(n) = plan
        .place
        .as_ref()
        .and_then(vramblk_daemon::locality::pinned_cpu_count)
    {
        plan.device.queues = n;
    }
}

/// Where GPU `gpu` sits, from the GPU list; None when there is no list
/// (the service logs why): the device then runs unpinned, and a missing
/// GPU is its server's error to report.
fn place_near(
    gpu: u32,
    gpus: &Result<Vec<gpu::GpuEntry>>,
    sysfs: &Path,
) -> Option<vramblk_config::GpuPlace> {
    match gpus {
        Ok(list) => list
            .iter()
            .find(|g| g.index == gpu)
            .map(|g| vramblk_daemon::locality::place_of(sysfs, &g.pci_bus_id)),
        Err(e) => {
            log::warn!("GPU {gpu}: where it sits is unknown ({e:#}); not pinning");
            None
        }
    }
}

pub fn run(a: &AddArgs) -> Result<()> {
    check_args(a)?;
    require_root("add")?;
    require_ublk_features()?;
    let mut plans = plans(a)?;
    if let Some(id) = a.id {
        if device_ids().contains(&id) {
            bail!("ublk device {id} already exists");
        }
    }
    if a.foreground {
        preflight(&plans[0])?;
    }
    let run_dir = Path::new(RUN_DIR);
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {RUN_DIR}"))?;

    let swap_on = a.swap.then_some((a.priority, discards_freed_swap(a)));
    if a.foreground {
        vramblk_daemon::init_logging(env_logger::Target::Stderr);
        return supervise::run(
            &plans[0],
            run_dir,
            Reporter::none(),
            Mode::Foreground { swap: swap_on },
        );
    }
    let several = plans.len() > 1;
    let mut added = Vec::new();
    for plan in &mut plans {
        let gpu = plan.gpu;
        match launch(plan, run_dir, swap_on) {
            Ok(id) => {
                println!("{}", bdev_path(id));
                added.push(id);
            }
            Err(e) if several => {
                // All or nothing: the devices this command added go again
                // (fresh, so their swap comes off quickly).
                if !added.is_empty() {
                    eprintln!(
                        "vramblk: the device on GPU {gpu} did not come up; removing the {} added \
                         before it",
                        added.len()
                    );
                }
                for &id in added.iter().rev() {
                    if let Err(e) = del::delete_one(run_dir, id) {
                        eprintln!("vramblk: {}: {e:#}", bdev_path(id));
                    }
                }
                return Err(e.context(format!("the device on GPU {gpu}")));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether swap on the device is turned on with `--discard`: when asked,
/// and always for a compressed device, whose size may exceed its VRAM. Its
/// freed swap pages must give their VRAM back: kept, they filled the VRAM
/// of a 2 GiB lz device on 512 MiB when a working set of real programs'
/// pages was written over a second time, and every later swap write failed
/// (ENOSPC; the corpus-swap VM boot, 2026-12-05). The service's config has
/// discard on by default.
fn discards_freed_swap(a: &AddArgs) -> bool {
    a.discard || a.compress != CompressArg::Off
}

/// Leaves a supervisor serving the plan's device, and sets up swap on it
/// (priority, discard) when asked; the device id. A device whose swap
/// cannot be set up is removed again.
pub fn launch(plan: &mut Plan, run_dir: &Path, swap_on: Option<(i32, bool)>) -> Result<u32> {
    preflight(plan)?;
    let log = process::log_path(run_dir);
    plan.log = log.clone();
    let plan = &*plan;
    // Under the service, the supervisor must not keep the service's
    // copies of other devices' memory.
    let id = process::spawn(&log, &vramblk_daemon::holder::held_fds(), |reporter| {
        supervise::run(plan, run_dir, reporter, Mode::Daemon)
    })?;
    let path = bdev_path(id);
    if let Some((priority, discard)) = swap_on {
        if let Err(e) = swap::enable(&path, priority, discard) {
            let _ = vramblk_ublk_target::control::delete_device(id);
            DeviceRecord::remove(run_dir, id);
            return Err(e.context(format!("setting up swap on {path}; device removed")));
        }
    }
    Ok(id)
}

/// Refuses, before anything is allocated, a device this machine cannot
/// hold: its host store, and everything it would lock in RAM.
fn preflight(plan: &Plan) -> Result<()> {
    if plan.backend == Backend::Host {
        HostStore::preflight(&HostStoreOptions {
            size: plan.size,
            hugetlb: plan.hugetlb,
        })?;
    }
    let mem = MemInfo::read().context("reading /proc/meminfo")?;
    budget::check(plan, &mem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command};
    use clap::Parser;

    fn add_args(extra: &[&str]) -> AddArgs {
        let argv = ["vramblk", "add", "--size", "1G"].iter().chain(extra);
        match Cli::try_parse_from(argv).expect("valid arguments").command {
            Command::Add(a) => a,
            _ => unreachable!("an add command"),
        }
    }

    #[test]
    fn freed_swap_is_discarded_when_asked_and_on_every_compressed_device() {
        assert!(!discards_freed_swap(&add_args(&["--swap"])));
        assert!(discards_freed_swap(&add_args(&["--swap", "--discard"])));
        assert!(discards_freed_swap(&add_args(&[
            "--swap",
            "--compress",
            "lz"
        ])));
        assert!(discards_freed_swap(&add_args(&[
            "--swap",
            "--compress",
            "same"
        ])));
    }
}
