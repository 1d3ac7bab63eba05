//! engine-bench: drives the real per-queue engine and the CUDA store with a
//! synthetic, ublk-shaped load (Q queue threads, depth D), checks data
//! against a host shadow, and times the shapes the issue names beside an
//! nbd-vram-shaped baseline measured in the same process. First of all it
//! checks that VRAM survives the death of the process that allocated it
//! (kill and recover, as the supervisor and its servers do).
//!
//! usage: engine-bench [--gpu N] [--size GiB] [--secs S] [--out FILE] [--checks-only]
//!        engine-bench [--gpu N] [--secs S] --rounds-only
//!        engine-bench --gpu all|N,M,... [--size GiB] [--secs S] [--out FILE]
//!        engine-bench [--gpu N] [--secs S] [--mib M] --compress-check [FILE...]
//!        engine-bench [--gpu N] --compress-checks
//!        engine-bench [--gpu N] [--size GiB] [--secs S] [--out F] [--policy spin|server]
//!                     --compress-bench [FILE...]
//!
//! `--checks-only` runs the checks on 256 MiB stores and times nothing:
//! what `cargo xtask test` runs on the stand-in libcuda (never GPU
//! evidence) to exercise cuda-store's logic where there is no GPU.
//! `--rounds-only` prints the rounds-per-queue table alone (issue 19).
//! `--gpu all` (or a list) times the several-GPU table alone (issue 21):
//! each GPU alone, then all at once, each with its own store and queues.
//! `--compress-check` holds the page codec's GPU kernels to the Rust
//! reference on the FILEs' pages (the corpus) and times them (issue 18;
//! compress.rs); `--secs 0` checks only. `--compress-checks` runs the
//! compressed store's checks alone (packed.rs; `--checks-only` runs them
//! too). `--compress-bench` times compression off beside `lz` on the FILEs'
//! pages and on random ones; its load threads poll without a nap as every
//! table's do, or with `--policy server` wait as the server's queue loop
//! does (spin a while, then nap).
//!
//! Exit status: 0 every check passed, 1 a check failed, 77 skipped (no
//! usable GPU here; the reason is printed).

mod ceiling;
mod compress;
mod context;
mod idle;
mod integrity;
mod load;
mod multi;
mod packed;
mod recovery;
mod table;
mod thin;

use anyhow::{bail, Result};

#[global_allocator]
static ALLOC: vramblk_alloc_count::Counting = vramblk_alloc_count::Counting;
use std::sync::Arc;
use vramblk_cuda_store::{CopyPolicy, CudaStore, CudaStoreOptions};
use vramblk_store::Store;

/// Exit status for "no GPU here" (automake's SKIP).
pub(crate) const SKIPPED: i32 = 77;

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
    let gpu_arg = args
        .iter()
        .position(|a| a == "--gpu")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_default();
    if gpu_arg == "all" || gpu_arg.contains(',') {
        return several_gpus(&gpu_arg, &args);
    }
    let gpu = arg(&args, "--gpu", 0) as u32;
    if args.iter().any(|a| a == "--context-probe") {
        std::process::exit(context::probe(gpu));
    }
    if let Some(at) = args.iter().position(|a| a == "--compress-check") {
        let files: Vec<std::path::PathBuf> = args[at + 1..]
            .iter()
            .take_while(|a| !a.starts_with("--"))
            .map(Into::into)
            .collect();
        let code = compress::run(
            gpu,
            &files,
            arg(&args, "--mib", 8),
            arg(&args, "--secs", 1) as f64,
        )?;
        std::process::exit(code);
    }
    if args.iter().any(|a| a == "--compress-checks") {
        return compressed_only(gpu);
    }
    if let Some(at) = args.iter().position(|a| a == "--compress-bench") {
        let mut corpus = Vec::new();
        for f in args[at + 1..].iter().take_while(|a| !a.starts_with("--")) {
            corpus.extend(std::fs::read(f)?);
        }
        corpus.truncate(corpus.len() / 4096 * 4096);
        let size = arg(&args, "--size", 4) << 30;
        let secs = arg(&args, "--secs", 1) as f64;
        let policy = match args.iter().position(|a| a == "--policy") {
            None => packed::LoadPolicy::Spin,
            Some(i) => match args.get(i + 1).map(String::as_str) {
                Some("spin") => packed::LoadPolicy::Spin,
                Some("server") => packed::LoadPolicy::Server,
                other => {
                    let got = other.map_or("nothing".to_string(), |o| format!("'{o}'"));
                    eprintln!("engine-bench: --policy takes spin or server, not {got}");
                    std::process::exit(2);
                }
            },
        };
        let report = match packed::bench(gpu, &corpus, size, secs, policy) {
            Ok(r) => r,
            Err(e) => {
                println!("SKIPPED: {e}");
                std::process::exit(SKIPPED);
            }
        };
        let store_name = CudaStore::context_only(gpu)
            .map(|s| s.gpu_name().to_string())
            .unwrap_or_default();
        let report = format!(
            "GPU: {store_name}, `engine-bench --compress-bench ({} MiB of corpus pages) --size {} --secs {secs} --policy {}`, {}\n\n{report}",
            corpus.len() >> 20,
            size >> 30,
            format!("{policy:?}").to_lowercase(),
            utc_now()
        );
        println!("{report}");
        if let Some(i) = args.iter().position(|a| a == "--out") {
            if let Some(path) = args.get(i + 1) {
                std::fs::write(path, &report)?;
            }
        }
        return Ok(());
    }
    let checks_only = args.iter().any(|a| a == "--checks-only");
    if args.iter().any(|a| a == "--rounds-only") {
        return rounds_only(gpu, arg(&args, "--secs", 1) as f64);
    }
    let size = if checks_only {
        256 << 20
    } else {
        arg(&args, "--size", 4) << 30
    };
    let secs = arg(&args, "--secs", 1) as f64;
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .cloned();
    // First, while this process has not touched CUDA (the check forks).
    let recovery = recovery::kill_and_recover(gpu, size.min(1 << 30), 3);
    let mut mid_give_back: Vec<(String, bool)> = [300u64, 1500, 6000]
        .into_iter()
        .map(|us| recovery::kill_during_give_back(gpu, std::time::Duration::from_micros(us)))
        .collect();
    mid_give_back.extend(compaction_kills(gpu));
    mid_give_back.push(recovery::context_lost(gpu, 64 << 20));
    // Every copy mode gets its own store: auto (the default: the copy
    // kernel for rounds of 4 requests or more), dma (copy engines only)
    // and, to show why auto leaves small rounds to the copy engines, the
    // kernel for every round; all with page checksums (the default), and
    // auto once more without them, to measure what they cost.
    let kernel_always = CopyPolicy {
        kernel_min_batch: 1,
        ..CopyPolicy::AUTO
    };
    let modes: [(&str, CopyPolicy, bool); 4] = [
        ("auto", CopyPolicy::AUTO, true),
        ("dma", CopyPolicy::DMA, true),
        ("kernel-always", kernel_always, true),
        (table::INTEGRITY_OFF, CopyPolicy::AUTO, false),
    ];
    let mut stores = Vec::new();
    for (mode, copy, integrity) in modes {
        let opts = CudaStoreOptions {
            copy,
            integrity: Some(integrity),
            ..CudaStoreOptions::new(size, gpu)
        };
        match CudaStore::create(&opts) {
            Ok(s) => stores.push((mode, Arc::new(s))),
            Err(e) => {
                println!("SKIPPED: {e}");
                std::process::exit(SKIPPED);
            }
        }
    }
    let store = stores[0].1.clone();
    // The round stages are timed only where asked for (the report's stage
    // table); a server never pays for it.
    vramblk_cuda_store::stages::enable();
    let version = store.driver_version();
    let header = format!(
        "GPU: {}, driver CUDA {}.{}, device {} MiB, `engine-bench {}`, {}",
        store.gpu_name(),
        version / 1000,
        (version % 1000) / 10,
        size >> 20,
        if checks_only {
            "--checks-only".to_string()
        } else {
            format!("--size {} --secs {secs}", size >> 30)
        },
        utc_now()
    );
    println!("{header}");

    let mut failures = 0;
    let recovery = recovery
        .unwrap_or_else(|e| vec![(format!("kill-and-recover could not start: {e}"), false)]);
    let mut results = recovery;
    results.extend(mid_give_back);
    for (mode, s) in &stores {
        if s.copy_policy() == CopyPolicy::DMA && *mode != "dma" {
            results.push((format!("{mode}: the copy kernel loaded"), false));
        }
        results.extend(load::data_checks(s, mode));
        if s.integrity() && *mode != "kernel-always" {
            results.extend(integrity::checks(s, mode));
        }
    }
    results.extend(load::store_checks(&store));
    results.push(context::standby_context_cost(&store, gpu));
    results.extend(thin::give_back_checks(gpu));
    results.extend(packed::checks(gpu));
    let mut checks = String::new();
    for (name, ok) in results {
        let line = format!("{} {name}", if ok { "PASS" } else { "FAIL" });
        println!("{line}");
        checks += &format!("- {line}\n");
        failures += usize::from(!ok);
    }
    if !checks_only {
        let by_mode: Vec<(&str, &CudaStore)> = stores.iter().map(|(m, s)| (*m, &**s)).collect();
        let rows = load::bench(&by_mode, secs);
        let (idle_cpu, idle_wall) = idle::cpu_over(std::time::Duration::from_secs(10));
        let policies = load::poll_policies(&store, secs);
        let rounds = load::round_sizes(&store, secs);
        let ceiling = match ceiling::measure(&store, secs) {
            Ok(c) => ceiling::table(&rows, "auto", &c),
            Err(e) => format!("not measured: {e:#}\n"),
        };
        let report = format!(
            "{header}\n\n#### Checks\n\n{checks}\n#### Targets (issue 3), default copy mode (auto)\n\n{}\n#### What the page checksums cost (issue 15): auto with them beside auto without, same run\n\n{}\n#### Against the ceiling (issue 19): the copy kernel alone for 4 KiB random, raw pinned copies (cuMemcpyAsync, no store) for QD1 and sequential, same run, default copy mode (auto)\n\n{}\n#### Host CPU per I/O (issue 19): the queue threads' CPU clocks (engine-bench's load loop polls without napping), default copy mode (auto)\n\n{}\n| with no I/O | measured | target | met |\n| --- | --- | --- | --- |\n{}\n#### Where a round's time goes (issue 19): the store's stages per round (cuda-store/src/stages.rs), 4 KiB random, auto with checksums, then without\n\n{}\n{}\n#### The queue's polling policy (issue 19): the load loop polling without a nap, with the server's queue-loop policy (ublk-target/src/poll_policy.rs; a sleep with 1 us timer slack here, an io_uring timeout there), and napping at once; auto\n\n{}\n#### Rounds in flight per queue (issue 19): a full queue's requests as one round or as two (so the GPU moves one while the next is built), 1-16 queues of depth 32, 64 and 128; the server splits where this measured a gain (ublk-target's engine::round_limit: depth 128, or depth 64 with at most 8 queues), and the tables above cut rounds as it does; auto, polling without a nap\n\n{}\n#### Every shape\n\n{}",
            table::targets(&rows, "auto"),
            table::integrity_cost(&rows),
            ceiling,
            table::host_cpu(&rows, "auto"),
            idle::line(idle_cpu, idle_wall),
            table::stage_times(&rows, "auto"),
            table::stage_times(&rows, table::INTEGRITY_OFF),
            table::variants_table(&policies, "policy"),
            table::variants_table(&rounds, "rounds"),
            table::table(&rows)
        );
        println!("{report}");
        if let Some(path) = out {
            std::fs::write(path, report)?;
        }
    }
    if failures > 0 {
        bail!("{failures} check(s) failed");
    }
    if checks_only {
        println!("every check passed (checks only, nothing timed)");
    }
    Ok(())
}

/// `--compress-checks`: the compressed store's checks alone (packed.rs).
/// A server killed early and late in a compacting give-back (forks: run
/// before this process touches CUDA).
fn compaction_kills(gpu: u32) -> Vec<(String, bool)> {
    [5u64, 60]
        .into_iter()
        .map(|ms| recovery::kill_during_compaction(gpu, std::time::Duration::from_millis(ms)))
        .collect()
}

fn compressed_only(gpu: u32) -> Result<()> {
    let kills = compaction_kills(gpu);
    if let Err(e) = CudaStore::context_only(gpu) {
        println!("SKIPPED: {e}");
        std::process::exit(SKIPPED);
    }
    let mut failures = 0;
    for (name, ok) in kills.into_iter().chain(packed::checks(gpu)) {
        println!("{} {name}", if ok { "PASS" } else { "FAIL" });
        failures += usize::from(!ok);
    }
    if failures > 0 {
        bail!("{failures} check(s) failed");
    }
    Ok(())
}

/// `--rounds-only`: the rounds table alone (one round beside two per
/// queue, 1-16 queues, depths 32-128; issue 19), on one 4 GiB store;
/// checks nothing.
fn rounds_only(gpu: u32, secs: f64) -> Result<()> {
    let store = match CudaStore::create(&CudaStoreOptions::new(4 << 30, gpu)) {
        Ok(s) => s,
        Err(e) => {
            println!("SKIPPED: {e}");
            std::process::exit(SKIPPED);
        }
    };
    println!(
        "GPU: {}, `engine-bench --rounds-only --secs {secs}`, {}",
        store.gpu_name(),
        utc_now()
    );
    load::map_every_extent(&store);
    let rows = load::round_sizes(&store, secs);
    println!("{}", table::variants_table(&rows, "rounds"));
    Ok(())
}

/// `--gpu all` or `--gpu N,M,...`: the several-GPU table alone, on a
/// store of `--size` GiB (default 4) per GPU.
fn several_gpus(which: &str, args: &[String]) -> Result<()> {
    let gpus: Vec<u32> = if which == "all" {
        match vramblk_cuda_store::probe::gpu_count() {
            Ok(n) => (0..n).collect(),
            Err(e) => {
                println!("SKIPPED: {e}");
                std::process::exit(SKIPPED);
            }
        }
    } else {
        which
            .split(',')
            .map(|g| g.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|_| anyhow::anyhow!("--gpu {which}: give all or indices (0,1)"))?
    };
    let size = arg(args, "--size", 4) << 30;
    let secs = arg(args, "--secs", 1) as f64;
    let mut stores = Vec::new();
    for &g in &gpus {
        match CudaStore::create(&CudaStoreOptions::new(size, g)) {
            Ok(s) => {
                load::map_every_extent(&s);
                stores.push((g, s));
            }
            Err(e) => {
                println!("SKIPPED: GPU {g}: {e}");
                std::process::exit(SKIPPED);
            }
        }
    }
    let names: Vec<String> = stores
        .iter()
        .map(|(g, s)| format!("{g}: {}", s.gpu_name()))
        .collect();
    let report = format!(
        "GPUs: {}; {} MiB store each, `engine-bench --gpu {which} --size {} --secs {secs}`, {}\n\n#### Every GPU at once (issue 21): each GPU alone, then all of them together, each with its own store and queues, same process; auto\n\n{}",
        names.join(", "),
        size >> 20,
        size >> 30,
        utc_now(),
        multi::table(&stores, secs)
    );
    println!("{report}");
    if let Some(path) = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
    {
        std::fs::write(path, report)?;
    }
    Ok(())
}

/// The time now in UTC, as `date -u` prints it (no date crate for one line).
pub(crate) fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "date unknown".into())
}
