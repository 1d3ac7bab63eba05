//! `vramblk up` and `vramblk down`: the devices of the config file, as swap.

use crate::add::{launch, place_near_gpu};
use crate::del::{delete_one, lock, vramblk_records};
use crate::gpu;
use anyhow::{bail, Result};
use std::path::Path;
use vramblk_config::{format_size, Backend, Config, RUN_DIR};
use vramblk_daemon::host::{pid_alive, require_driver, require_root};
use vramblk_daemon::plan::Plan;
use vramblk_ublk_target::control::bdev_path;

/// The devices that serve config entries now: (entry, device id).
pub fn configured_devices(run_dir: &Path) -> Vec<(usize, u32)> {
    vramblk_records(run_dir)
        .into_iter()
        .filter(|r| r.holder_pid.is_some_and(pid_alive) || pid_alive(r.pid))
        .filter_map(|r| Some((r.origin?, r.id)))
        .collect()
}

/// Brings up every entry of `config` that `wanted` accepts and is not up
/// yet, each as swap at its priority. Tries them all; the error names how
/// many failed.
pub fn bring_up(config: &Config, wanted: impl Fn(usize) -> bool) -> Result<Vec<u32>> {
    let run_dir = Path::new(RUN_DIR);
    std::fs::create_dir_all(run_dir)?;
    let _lock = lock(run_dir)?;
    let up = configured_devices(run_dir);
    let mut ids = Vec::new();
    let mut failed = 0;
    // The GPU list, taken once for every cuda device brought up here.
    let mut gpus = None;
    for (index, d) in config.devices.iter().enumerate() {
        if !wanted(index) {
            continue;
        }
        // The file's entry, as `config check` numbers it (an entry over
        // several GPUs is several devices).
        let entry = d.entry;
        if let Some((_, id)) = up.iter().find(|(i, _)| *i == index) {
            println!("device {entry}: already up as {}", bdev_path(*id));
            ids.push(*id);
            continue;
        }
        let result = Plan::from_config(d, index).and_then(|mut plan| {
            if plan.backend == Backend::Cuda {
                let gpus = gpus.get_or_insert_with(gpu::inventory);
                place_near_gpu(&mut plan, gpus, Path::new("/sys"), d.queues.is_some());
            }
            launch(&mut plan, run_dir, Some((d.priority, d.discard)))
        });
        match result {
            Ok(id) => {
                let on = match (d.backend, d.gpu.single()) {
                    (Backend::Cuda, Some(g)) => format!("cuda (GPU {g})"),
                    (b, _) => b.to_string(),
                };
                println!(
                    "device {entry}: {} up, {} on {on}, swap priority {}",
                    bdev_path(id),
                    format_size(d.size),
                    d.priority
                );
                log::info!("up: device {entry} is {} ({on})", bdev_path(id));
                ids.push(id);
            }
            Err(e) => {
                eprintln!("vramblk: device {entry}: {e:#}");
                log::error!("up: device {entry}: {e:#}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} configured device(s) did not come up");
    }
    Ok(ids)
}

/// Swaps off and removes the configured devices `wanted` accepts. A device
/// whose pages RAM cannot take back is left serving, and the error says
/// so: a page is never dropped.
pub fn take_down(wanted: impl Fn(usize) -> bool) -> Result<()> {
    let run_dir = Path::new(RUN_DIR);
    std::fs::create_dir_all(run_dir)?;
    let _lock = lock(run_dir)?;
    let mut refused = 0;
    for (index, id) in configured_devices(run_dir) {
        if !wanted(index) {
            continue;
        }
        match delete_one(run_dir, id) {
            Ok(()) => log::info!("down: device {index} ({}) removed", bdev_path(id)),
            Err(e) => {
                eprintln!("vramblk: device {index}: {e:#}");
                log::error!("down: device {index}: {e:#}");
                refused += 1;
            }
        }
    }
    if refused > 0 {
        bail!("{refused} device(s) left up");
    }
    Ok(())
}

pub fn up(path: &Path) -> Result<()> {
    require_root("up")?;
    require_driver()?;
    let config = crate::gpu::one_device_per_gpu(Config::load(path)?)?;
    if config.devices.is_empty() {
        println!(
            "{}: no [[device]] entries; nothing to bring up",
            path.display()
        );
        return Ok(());
    }
    bring_up(&config, |_| true).map(|_| ())
}

pub fn down() -> Result<()> {
    require_root("down")?;
    require_driver()?;
    if let Some(result) = failed_service_result() {
        // The unit's ExecStop after its main process failed: systemd is
        // about to restart it, and the new one adopts the devices.
        println!(
            "the service's main process failed ({result}); leaving the devices serving for \
             its restart (run `vramblk down` by hand to take them down)"
        );
        return Ok(());
    }
    take_down(|_| true)
}

/// systemd's SERVICE_RESULT for ExecStop, when it is not "success".
fn failed_service_result() -> Option<String> {
    std::env::var("SERVICE_RESULT")
        .ok()
        .filter(|r| !r.is_empty() && r != "success")
}
