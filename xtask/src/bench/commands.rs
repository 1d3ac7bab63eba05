//! `cargo xtask bench-commands`: a device's queues with the kernel's batch
//! commands (UBLK_F_BATCH_IO, 7.0+) beside the same device with per-tag
//! commands, in one VM boot of a kernel that has both (7.3 unless
//! VRAMBLK_VM_KERNEL names another); writes the table into
//! docs/benchmarks.md.

use super::parse::{self, Sample};
use super::report::{mean, of, paired, JOBS};
use super::{bench_initrd, bench_script, qemu_version, utc_now, Guest, Limits};
use crate::{deps, kernel, suite};
use anyhow::{bail, Result};
use std::fmt::Write;
use std::path::Path;
use std::time::Instant;

const SCRIPT: &str = include_str!("../../../bench/vm/bench-commands.sh");

/// The kernel series the comparison boots unless VRAMBLK_VM_KERNEL says.
const SERIES: &str = "7.3";

const BATCH: &str = "vramblk-batch";
const PER_TAG: &str = "vramblk-per-tag";

const BEGIN: &str =
    "<!-- cargo xtask bench-commands: begin (generated; edits here are overwritten) -->";
const END: &str = "<!-- cargo xtask bench-commands: end -->";

/// `bench-commands` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Seconds per job (the seed's randrw runs its own 20 s).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub secs: u32,
    /// Rounds; each runs both kinds, the first kind alternating.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
}

pub fn run(root: &Path, o: &Options) -> Result<()> {
    let started = Instant::now();
    deps::ensure_bench()?;
    let guest_bins = suite::build_guest_bins(root)?;
    let vm_dir = root.join("target/vm");
    let series = std::env::var("VRAMBLK_VM_KERNEL").unwrap_or_else(|_| SERIES.into());
    let kernel = kernel::fetch_series(&vm_dir, kernel::Series::named(&series)?)?;
    println!("== guest kernel: Debian's {}", kernel.release);
    let initrd = bench_initrd(
        &vm_dir,
        "bench-commands",
        &kernel,
        &guest_bins,
        &bench_script(SCRIPT, o.secs, o.rounds),
        &[],
    )?;
    let guest = Guest {
        vm_dir: &vm_dir,
        vmlinuz: &kernel.vmlinuz,
        initrd: &initrd,
    };
    println!(
        "== bench-commands: {} rounds, {} s per job",
        o.rounds, o.secs
    );
    let r = guest.boot(
        "bench-commands",
        "4G",
        "",
        Limits {
            total_s: 40 * 60,
            quiet: None,
        },
    )?;
    let failures: Vec<&String> = r.lines.iter().filter(|l| l.starts_with("FAIL")).collect();
    for f in &failures {
        println!("   {f}");
    }
    let (samples, unreadable) = parse::samples(&r.lines);
    if samples.is_empty() || !failures.is_empty() {
        bail!(
            "the boot failed a check or produced no results (see target/vm/console-bench-commands.log)"
        );
    }
    let section = markdown(&samples, unreadable, o, &kernel.release, started);
    let path = root.join("docs/benchmarks.md");
    crate::docs::splice(&path, BEGIN, END, &section)?;
    println!("{section}");
    println!("== wrote {}", path.display());
    Ok(())
}

fn fmt(x: Option<f64>) -> String {
    match x {
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.1}"),
        None => "-".into(),
    }
}

/// One row per job both kinds ran: each kind's mean over the rounds, its
/// latency where fio gives one, and batch's figure over per-tag's taken
/// within each round (above 1: batch better, for latency too).
fn table(samples: &[Sample]) -> String {
    let mut md = String::from(
        "| job | unit | batch | per-tag | batch vs per-tag | batch p50 / p99 us | per-tag p50 / p99 us |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for job in JOBS {
        let (b, p) = (of(samples, BATCH, job.name), of(samples, PER_TAG, job.name));
        if b.is_empty() || p.is_empty() {
            continue;
        }
        let lat = |v: &[&Sample]| {
            format!(
                "{} / {}",
                fmt(mean(v.iter().filter_map(|s| s.p50_us))),
                fmt(mean(v.iter().filter_map(|s| s.p99_us)))
            )
        };
        let ratio = if job.higher_is_better {
            paired(samples, BATCH, PER_TAG, job.name)
        } else {
            paired(samples, PER_TAG, BATCH, job.name)
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            job.title,
            job.unit,
            fmt(mean(b.iter().map(|s| s.value))),
            fmt(mean(p.iter().map(|s| s.value))),
            ratio.map_or("-".into(), |r| format!("{r:.2}x")),
            lat(&b),
            lat(&p)
        );
    }
    md
}

fn markdown(
    samples: &[Sample],
    unreadable: usize,
    o: &Options,
    release: &str,
    started: Instant,
) -> String {
    let date = utc_now();
    let mut md = format!(
        "{BEGIN}\n## Batch commands beside per-tag commands (`cargo xtask bench-commands`)\n\n\
         Generated {date} by `cargo xtask bench-commands --secs {} --rounds {}` in {:.1} minutes, \
         one boot of Debian's {release} (qemu TCG, {}, 2 vCPUs): the same vramblk device (host \
         backend, 2 GiB, 1 queue of depth 128, its server pinned to vCPU 1, fio on vCPU 0) with \
         batch commands (UBLK_F_BATCH_IO: one multishot FETCH delivers a round's tags, one COMMIT \
         returns their results) and with per-tag commands (`--io-commands per-tag`: one FETCH and \
         one COMMIT per request), in turn every round, the first kind alternating. **Emulated:** \
         read the ratios, taken within each round and then averaged; above 1 means batch is \
         better, for latency too. The jobs are bench/jobs/run-jobs.sh's fio jobs.\n\n",
        o.secs,
        o.rounds,
        started.elapsed().as_secs_f64() / 60.0,
        qemu_version(),
    );
    if unreadable > 0 {
        let _ = writeln!(
            md,
            "{unreadable} job record(s) could not be read from the console and are missing below.\n"
        );
    }
    md.push_str(&table(samples));
    md.push('\n');
    md.push_str(END);
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(device: &str, job: &str, round: u32, value: f64) -> Sample {
        parse::sample(device, job, round, value)
    }

    #[test]
    fn ratios_say_how_much_better_batch_is_for_speed_and_for_latency() {
        let samples = vec![
            s(BATCH, "randread-qd128", 1, 300.0),
            s(PER_TAG, "randread-qd128", 1, 200.0),
            s(BATCH, "randread-qd128", 2, 400.0),
            s(PER_TAG, "randread-qd128", 2, 400.0),
            // latency: lower is better, so per-tag over batch
            s(BATCH, "randread-qd1", 1, 50.0),
            s(PER_TAG, "randread-qd1", 1, 100.0),
            // a job only one kind ran has no row
            s(BATCH, "seqread-1m", 1, 9.0),
        ];
        let t = table(&samples);
        let row = |name: &str| {
            t.lines()
                .find(|l| l.contains(name))
                .unwrap_or_default()
                .to_string()
        };
        assert!(row("random read, iodepth 128").contains("| 1.25x |"), "{t}");
        assert!(row("random read, iodepth 1").contains("| 2.00x |"), "{t}");
        assert_eq!(row("sequential read"), "");
    }
}
