//! `vramblk add`.

use crate::args::{AddArgs, BackendArg, CopyModeArg, IntegrityArg};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use vramblk_config::{
    defaults, parse_size, parse_size_or_zero, Backend, CopyMode, DeviceRecord, RUN_DIR,
};
use vramblk_daemon::budget;
use vramblk_daemon::host::{cpu_count, require_root, require_ublk_features};
use vramblk_daemon::plan::Plan;
use vramblk_daemon::process::{self, Reporter};
use vramblk_daemon::supervise::{self, Mode};
use vramblk_daemon::swap;
use vramblk_host_store::{HostStore, HostStoreOptions, MemInfo};
use vramblk_ublk_target::control::{bdev_path, device_ids};
use vramblk_ublk_target::DeviceOptions;

fn plan(a: &AddArgs) -> Result<Plan> {
    let size = parse_size(&a.size).map_err(|e| anyhow!("--size: {e}"))?;
    if size % 4096 != 0 {
        bail!("--size: {size} bytes is not a multiple of 4 KiB");
    }
    let backend = match a.backend {
        BackendArg::Cuda => Backend::Cuda,
        BackendArg::Host => Backend::Host,
    };
    let reserve = parse_size_or_zero(&a.reserve).map_err(|e| anyhow!("--reserve: {e}"))?;
    if a.hugepages && backend != Backend::Host {
        bail!("--hugepages applies to --backend host only");
    }
    let device = DeviceOptions {
        id: a.id.map(|i| i as i32).unwrap_or(-1),
        queues: a.queues.unwrap_or_else(cpu_count),
        depth: a.depth,
        max_io_bytes: defaults::MAX_IO_BYTES,
    };
    device.validate()?;
    Ok(Plan {
        size,
        backend,
        hugetlb: a.hugepages,
        gpu: a.gpu,
        reserve,
        copy_mode: match a.copy_mode {
            CopyModeArg::Auto => CopyMode::Auto,
            CopyModeArg::Dma => CopyMode::Dma,
        },
        integrity: match a.integrity {
            IntegrityArg::Auto => None,
            IntegrityArg::On => Some(true),
            IntegrityArg::Off => Some(false),
        },
        device,
        log: PathBuf::from("-"),
        origin: None,
    })
}

pub fn run(a: &AddArgs) -> Result<()> {
    let mut plan = plan(a)?;
    require_root("add")?;
    require_ublk_features()?;
    if let Some(id) = a.id {
        if device_ids().contains(&id) {
            bail!("ublk device {id} already exists");
        }
    }
    if a.foreground {
        preflight(&plan)?;
    }
    let run_dir = Path::new(RUN_DIR);
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {RUN_DIR}"))?;

    if a.foreground {
        vramblk_daemon::init_logging(env_logger::Target::Stderr);
        let swap = a.swap.then_some((a.priority, a.discard));
        return supervise::run(&plan, run_dir, Reporter::none(), Mode::Foreground { swap });
    }
    let id = launch(
        &mut plan,
        run_dir,
        a.swap.then_some((a.priority, a.discard)),
    )?;
    println!("{}", bdev_path(id));
    Ok(())
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
