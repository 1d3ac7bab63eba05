//! engine-bench: drives the real per-queue engine and the CUDA store with a
//! synthetic, ublk-shaped load (Q queue threads, depth D), checks data
//! against a host shadow, and times the shapes the issue names beside an
//! nbd-vram-shaped baseline measured in the same process. First of all it
//! checks that VRAM survives the death of the process that allocated it
//! (kill and recover, as the supervisor and its servers do).
//!
//! usage: engine-bench [--gpu N] [--size GiB] [--secs S] [--out FILE]

mod load;
mod recovery;

use anyhow::{bail, Result};
use std::sync::Arc;
use vramblk_cuda_store::{CudaStore, CudaStoreOptions};

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args: Vec<String> = std::env::args().collect();
    let gpu = arg(&args, "--gpu", 0) as u32;
    let size = arg(&args, "--size", 4) << 30;
    let secs = arg(&args, "--secs", 1) as f64;
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .cloned();
    // First, while this process has not touched CUDA (the check forks).
    let recovery = recovery::kill_and_recover(gpu, 1 << 30, 3);
    let store = match CudaStore::create(&CudaStoreOptions {
        size,
        gpu,
        reserve: 512 << 20,
    }) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            println!("SKIPPED: {e}");
            return Ok(());
        }
    };
    let mut version = 0;
    // SAFETY: valid out-pointer; the driver is initialised by create().
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    let header = format!(
        "GPU: {}, driver CUDA {}.{}, device {} GiB",
        store.gpu_name(),
        version / 1000,
        (version % 1000) / 10,
        size >> 30
    );
    println!("{header}");

    let mut failures = 0;
    let recovery = recovery
        .unwrap_or_else(|e| vec![(format!("kill-and-recover could not start: {e}"), false)]);
    for (name, ok) in recovery.into_iter().chain(load::checks(&store)) {
        println!("{} {name}", if ok { "PASS" } else { "FAIL" });
        failures += usize::from(!ok);
    }
    let table = load::bench(&store, secs);
    println!("{header}\n{table}");
    if let Some(path) = out {
        std::fs::write(path, format!("{header}\n\n{table}"))?;
    }
    if failures > 0 {
        bail!("{failures} check(s) failed");
    }
    Ok(())
}
