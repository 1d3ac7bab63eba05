//! `vramblk add`.

use crate::args::{AddArgs, BackendArg};
use crate::daemon::{self, Reporter};
use crate::host::{cpu_count, require_driver, require_root};
use crate::swap;
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use std::sync::Arc;
use vramblk_config::{defaults, format_size, parse_size, Backend, DeviceRecord, RUN_DIR};
use vramblk_cuda_store::{CudaStore, CudaStoreOptions};
use vramblk_host_store::{HostStore, HostStoreOptions};
use vramblk_store::Store;
use vramblk_ublk_target::control::{bdev_path, device_ids};
use vramblk_ublk_target::{serve, DeviceOptions};

/// Everything `add` decided before touching the kernel.
struct Plan {
    size: u64,
    backend: Backend,
    hugetlb: bool,
    gpu: u32,
    reserve: u64,
    device: DeviceOptions,
}

fn plan(a: &AddArgs) -> Result<Plan> {
    let size = parse_size(&a.size).map_err(|e| anyhow!("--size: {e}"))?;
    if size % 4096 != 0 {
        bail!("--size: {size} bytes is not a multiple of 4 KiB");
    }
    let backend = match a.backend {
        BackendArg::Cuda => Backend::Cuda,
        BackendArg::Host => Backend::Host,
    };
    let reserve = parse_size(&a.reserve).map_err(|e| anyhow!("--reserve: {e}"))?;
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
        device,
    })
}

pub fn run(a: &AddArgs) -> Result<()> {
    let plan = plan(a)?;
    require_root("add")?;
    require_driver()?;
    if let Some(id) = a.id {
        if device_ids().contains(&id) {
            bail!("ublk device {id} already exists");
        }
    }
    let host_opts = HostStoreOptions {
        size: plan.size,
        hugetlb: plan.hugetlb,
    };
    if plan.backend == Backend::Host {
        HostStore::preflight(&host_opts)?;
    }
    let run_dir = Path::new(RUN_DIR);
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {RUN_DIR}"))?;

    if a.foreground {
        crate::init_logging(env_logger::Target::Stderr);
        let swap = a.swap.then_some((a.priority, a.discard));
        return serve_device(
            &plan,
            &host_opts,
            run_dir,
            Reporter::none(),
            Mode::Foreground { swap },
        );
    }

    let log = daemon::log_path(run_dir);
    let id = daemon::spawn(&log, |reporter| {
        serve_device(&plan, &host_opts, run_dir, reporter, Mode::Daemon)
    })?;
    let path = bdev_path(id);
    if a.swap {
        if let Err(e) = swap::enable(&path, a.priority, a.discard) {
            let _ = vramblk_ublk_target::control::delete_device(id);
            DeviceRecord::remove(run_dir, id);
            return Err(e.context(format!("setting up swap on {path}; device removed")));
        }
    }
    println!("{path}");
    Ok(())
}

/// How the serving process was started.
enum Mode {
    /// In the user's process; sets up swap itself (priority, discard).
    Foreground { swap: Option<(i32, bool)> },
    /// Detached; the parent sets up swap once told the device is live.
    Daemon,
}

/// Runs in the daemon (or the foreground process): builds the store and
/// serves the device until it is deleted.
fn serve_device(
    plan: &Plan,
    host_opts: &HostStoreOptions,
    run_dir: &Path,
    reporter: Reporter,
    mode: Mode,
) -> Result<()> {
    let (foreground, foreground_swap) = match mode {
        Mode::Foreground { swap } => (true, swap),
        Mode::Daemon => (false, None),
    };
    daemon::harden_for_swap()?;
    // The store is made here, after the fork: CUDA must not be initialised
    // in a process that forks afterwards.
    match plan.backend {
        Backend::Host => {
            let store = Arc::new(HostStore::create(host_opts)?);
            serve_store(plan, store, run_dir, reporter, foreground, foreground_swap)
        }
        Backend::Cuda => {
            let store = Arc::new(CudaStore::create(&CudaStoreOptions {
                size: plan.size,
                gpu: plan.gpu,
                reserve: plan.reserve,
            })?);
            if store.size() < plan.size {
                log::warn!(
                    "VRAM short: {} asked, {} granted",
                    format_size(plan.size),
                    format_size(store.size())
                );
            }
            serve_store(plan, store, run_dir, reporter, foreground, foreground_swap)
        }
    }
}

fn serve_store<S: Store>(
    plan: &Plan,
    store: Arc<S>,
    run_dir: &Path,
    reporter: Reporter,
    foreground: bool,
    foreground_swap: Option<(i32, bool)>,
) -> Result<()> {
    log::info!(
        "adding a {} device on {} with {} queues x depth {} ({} MiB of io buffers locked)",
        format_size(store.size()),
        store.describe(),
        plan.device.queues,
        plan.device.depth,
        plan.device.locked_buffer_bytes() >> 20
    );
    let record_base = DeviceRecord {
        id: 0,
        size: store.size(),
        backend: plan.backend,
        store: store.describe(),
        gpu: (plan.backend == Backend::Cuda).then_some(plan.gpu),
        queues: plan.device.queues,
        depth: plan.device.depth,
        // SAFETY: getpid has no preconditions.
        pid: unsafe { libc::getpid() } as u32,
        log: daemon::log_path(run_dir),
    };
    let dir = run_dir.to_path_buf();
    let live_reporter = reporter.clone();
    let id_cell = Arc::new(std::sync::Mutex::new(None));
    let id_seen = id_cell.clone();
    let on_live = move |ctrl: &libublk::ctrl::UblkCtrl| {
        let id = ctrl.dev_info().dev_id;
        *id_seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
        let record = DeviceRecord { id, ..record_base };
        if let Err(e) = record.store(&dir) {
            log::warn!("could not write the device record: {e}");
        }
        let path = bdev_path(id);
        log::info!("{path} is live");
        if let Some((priority, discard)) = foreground_swap {
            if let Err(e) = swap::enable(&path, priority, discard) {
                log::error!("{e:#}; removing the device");
                let _ = ctrl.kill_dev();
                return;
            }
        }
        if foreground {
            println!("{path}");
        }
        live_reporter.live(id);
    };
    let result = serve(&plan.device, store, on_live);
    if let Some(id) = *id_cell.lock().unwrap_or_else(|p| p.into_inner()) {
        DeviceRecord::remove(run_dir, id);
        log::info!("{} removed; daemon exiting", bdev_path(id));
    }
    result.context("serving the device")?;
    Ok(())
}
