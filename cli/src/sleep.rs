//! `vramblk sleep prepare|resume`, run by vramblk-sleep.service around
//! suspend and hibernate. VRAM contents are not promised across a suspend
//! on every driver, and a hibernation image must not go to a device that
//! is gone after power-off, so every vramblk swap device is swapped off
//! before sleeping (its pages back in RAM) and on again after. When RAM
//! cannot take the pages back, prepare fails with a clear message, and
//! with it the sleep: refusing to sleep loses nothing, sleeping could.

use crate::del::{lock, vramblk_records};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use vramblk_config::{store_json, RUN_DIR};
use vramblk_daemon::host::require_root;
use vramblk_daemon::swap;
use vramblk_ublk_target::control::bdev_path;

/// The swap areas prepare turned off, to turn back on at resume.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct SwappedOff {
    /// (device path, priority)
    devices: Vec<(String, i32)>,
}

fn state_path(run_dir: &Path) -> PathBuf {
    run_dir.join("sleep.json")
}

pub fn prepare() -> Result<()> {
    require_root("sleep prepare")?;
    let run_dir = Path::new(RUN_DIR);
    std::fs::create_dir_all(run_dir)?;
    let _lock = lock(run_dir)?;
    let mut off = SwappedOff::default();
    let on: Vec<(String, i32)> = vramblk_records(run_dir)
        .iter()
        .filter_map(|r| {
            let path = bdev_path(r.id);
            swap::find(&path).map(|s| (path, s.priority))
        })
        .collect();
    let mut refused = Vec::new();
    for (path, priority) in on {
        match swap::disable(&path) {
            Ok(()) => {
                log::info!("sleep: {path} swapped off for the sleep");
                off.devices.push((path, priority));
            }
            Err(e) => refused.push(format!("{e:#}")),
        }
    }
    // Written even when refusing: resume turns back on what did go off.
    store_json(&state_path(run_dir), &off).context("recording the swapped-off devices")?;
    if !refused.is_empty() {
        for r in &refused {
            eprintln!("vramblk: {r}");
        }
        bail!(
            "refusing to sleep: {} vramblk swap device(s) could not be emptied into RAM, and their pages would not survive the sleep",
            refused.len()
        );
    }
    println!(
        "{} vramblk swap device(s) swapped off for the sleep",
        off.devices.len()
    );
    Ok(())
}

pub fn resume() -> Result<()> {
    require_root("sleep resume")?;
    let run_dir = Path::new(RUN_DIR);
    let _lock = lock(run_dir)?;
    let path = state_path(run_dir);
    let off: SwappedOff = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut failed = 0;
    for (dev, priority) in &off.devices {
        // The contents are not trusted after a sleep: a fresh mkswap.
        match swap::enable(dev, *priority, false) {
            Ok(()) => println!("{dev}: swap on again at priority {priority}"),
            Err(e) => {
                eprintln!("vramblk: {dev}: {e:#}");
                failed += 1;
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    if failed > 0 {
        bail!("{failed} device(s) did not come back as swap after the sleep");
    }
    Ok(())
}
