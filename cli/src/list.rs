//! `vramblk list` and `vramblk features`.

use anyhow::Result;
use std::path::Path;
use vramblk_config::{format_size, DeviceRecord, RUN_DIR};
use vramblk_daemon::host::pid_alive;
use vramblk_daemon::swap;
use vramblk_ublk_target::control::{self, bdev_path, device_ids, DeviceState};

pub fn run() -> Result<()> {
    control::require_driver()?;
    let run_dir = Path::new(RUN_DIR);
    println!(
        "{:<4} {:<13} {:>6} {:<22} {:>4} {:>6} {:>5} {:<16} {:<16} {:>7}",
        "ID", "PATH", "SIZE", "BACKEND", "GPU", "QUEUES", "DEPTH", "STATE", "SWAP", "PID"
    );
    for id in device_ids() {
        let info = control::device_info(id).ok();
        let record = DeviceRecord::load(run_dir, id);
        let path = bdev_path(id);
        let pid = record
            .as_ref()
            .map(|r| r.pid as i32)
            .or(info.as_ref().map(|i| i.daemon_pid));
        let alive = pid.is_some_and(|p| p > 0 && pid_alive(p as u32));
        let state = device_state(info.as_ref(), record.as_ref(), alive);
        let swap = swap::find(&path)
            .map(|s| format!("on, {} MiB used", s.used_kib >> 10))
            .unwrap_or_else(|| "off".into());
        let (size, backend, gpu) = match &record {
            Some(r) => (
                format_size(r.size),
                r.store.clone(),
                r.gpu.map(|g| g.to_string()).unwrap_or_else(|| "-".into()),
            ),
            None => ("?".into(), "(not vramblk)".into(), "-".into()),
        };
        println!(
            "{:<4} {:<13} {:>6} {:<22} {:>4} {:>6} {:>5} {:<16} {:<16} {:>7}",
            id,
            path,
            size,
            backend,
            gpu,
            info.as_ref()
                .map(|i| i.queues.to_string())
                .unwrap_or_default(),
            info.as_ref()
                .map(|i| i.depth.to_string())
                .unwrap_or_default(),
            state,
            swap,
            pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        );
    }
    Ok(())
}

/// A device's state in words, from the kernel's view and whether its
/// server (and supervisor) live: `live`, `recovering` (the supervisor is
/// bringing a new server), `dead (server gone)`, ...
pub fn device_state(
    info: Option<&control::DeviceInfo>,
    record: Option<&DeviceRecord>,
    server_alive: bool,
) -> String {
    let holder_alive = record.and_then(|r| r.holder_pid).is_some_and(pid_alive);
    match (info, server_alive) {
        (Some(i), true) => i.state.to_string(),
        (Some(_), false) if holder_alive => "recovering".into(),
        (Some(i), false) if i.state == DeviceState::Live => "dead (server gone)".into(),
        (Some(i), false) => format!("{} (no server)", i.state),
        (None, _) => "unknown".into(),
    }
}

pub fn features() -> Result<()> {
    control::require_driver()?;
    match libublk::ctrl::UblkCtrl::get_features() {
        Some(f) => {
            println!("ublk driver features: {f:#x}");
            for line in vramblk_ublk_target::features::describe(f) {
                println!("  {line}");
            }
            if let Err(e) = control::require_features() {
                println!("{e}");
            }
        }
        None => println!("this kernel's ublk driver does not report features (older than 6.5)"),
    }
    Ok(())
}
