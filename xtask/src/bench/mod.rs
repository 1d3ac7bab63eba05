//! `cargo xtask bench`: vramblk side by side with its peers in one VM
//! boot (the job boot), then one boot per device as the only swap under
//! memory pressure; writes the tables and a picture into
//! docs/benchmarks.md.

pub mod commands;
mod parse;
mod report;

use crate::{deps, initramfs, kernel, qemu, suite};
use anyhow::{bail, Result};
use parse::{Sample, SwapRun};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const INIT: &str = include_str!("../../vm/init.sh");
const LIB: &str = include_str!("../../vm/lib.sh");
const RUN_JOBS: &str = include_str!("../../../bench/jobs/run-jobs.sh");
const DEVICES_SH: &str = include_str!("../../../bench/vm/devices.sh");
const BENCH_IO: &str = include_str!("../../../bench/vm/bench-io.sh");
const BENCH_SWAP: &str = include_str!("../../../bench/vm/bench-swap.sh");

/// rublk, the ublk author's reference server, as the best ublk server to
/// compare with; installed from crates.io into target/bench-tools.
const RUBLK_VERSION: &str = "0.2.15";

const HOST_BINS: &[&str] = &[
    "/usr/bin/fio",
    "/usr/bin/ioping",
    "/usr/bin/nbdkit",
    "/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-memory-plugin.so",
    "/sbin/nbd-client",
    "/usr/bin/taskset",
    "/bin/dd",
    "/sbin/mkswap",
    "/sbin/swapon",
    "/sbin/swapoff",
];

/// A swap-pressure boot's limits: the whole run, and console silence (the
/// guest prints a heartbeat every 5 s, so silence means it hung).
const SWAP_LIMIT_S: u64 = 300;
const SWAP_QUIET_S: u64 = 20;

/// Devices tried as swap (rublk null keeps no data, so it cannot be swap).
const SWAP_DEVICES: &[&str] = &["vramblk", "rublk_loop", "nbd", "zram"];

/// `bench` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Seconds per job.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub secs: u32,
    /// Rounds of every job (the figures are their spread).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Skip the swap-under-pressure boots.
    #[arg(long = "no-swap", action = clap::ArgAction::SetFalse)]
    pub swap: bool,
    /// Skip the side-by-side jobs boot.
    #[arg(long = "no-jobs", action = clap::ArgAction::SetFalse)]
    pub jobs: bool,
}

pub fn run(root: &Path, o: &Options) -> Result<()> {
    let started = Instant::now();
    deps::ensure_bench()?;
    let rublk = install_rublk(root)?;
    let mut guest_bins = suite::build_guest_bins(root)?;
    guest_bins.push(rublk);
    let vm_dir = root.join("target/vm");
    let kernel = kernel::fetch(&vm_dir)?;
    println!("== guest kernel: Debian's {}", kernel.release);
    let initrd = bench_initrd(
        &vm_dir,
        "bench",
        &kernel,
        &guest_bins,
        &bench_script(BENCH_IO, o.secs, o.rounds),
        &[("/lib/vm/swap.sh", BENCH_SWAP)],
    )?;
    let qemu_version = qemu_version();

    let guest = Guest {
        vm_dir: &vm_dir,
        vmlinuz: &kernel.vmlinuz,
        initrd: &initrd,
    };
    let mut samples: Vec<Sample> = Vec::new();
    let mut unreadable = 0;
    if o.jobs {
        println!(
            "== bench: job boot ({} rounds, {} s per job; the seed's own jobs at their own length)",
            o.rounds, o.secs
        );
        let r = guest.boot(
            "bench-jobs",
            "4G",
            "",
            Limits {
                total_s: 40 * 60,
                quiet: None,
            },
        )?;
        let (s, bad) = parse::samples(&r.lines);
        samples = s;
        unreadable = bad;
        if samples.is_empty() {
            bail!("the job boot produced no results (see target/vm/console-bench-jobs.log)");
        }
    }
    let mut swaps: Vec<SwapRun> = Vec::new();
    if o.swap {
        for kind in SWAP_DEVICES {
            println!("== bench: swap-pressure boot, {kind} as the only swap");
            let name = format!("bench-swap-{kind}");
            let cmdline = format!("hugepages=256 bench.swapdev={kind} vm.script=swap");
            let r = guest.boot(
                &name,
                "1G",
                &cmdline,
                Limits {
                    total_s: SWAP_LIMIT_S,
                    quiet: Some(Duration::from_secs(SWAP_QUIET_S)),
                },
            )?;
            let run = parse::swap_run(&kind.replace('_', "-"), &r.lines);
            println!("   {}: {}", kind, report::swap_outcome(&run));
            swaps.push(run);
        }
    }
    let out = Report {
        samples: &samples,
        unreadable,
        swaps: &swaps,
        options: o,
        qemu: &qemu_version,
        minutes: started.elapsed().as_secs_f64() / 60.0,
    };
    out.write(root)
}

/// A benchmark boot's script: `body` with its seconds per job and rounds.
fn bench_script(body: &str, secs: u32, rounds: u32) -> String {
    format!("export BENCH_SECS={secs} BENCH_ROUNDS={rounds}\n{body}")
}

/// The initramfs of benchmark boot `name`: the guest binaries, the
/// kernel's modules, the job and device scripts, `suite` as the script the
/// guest runs, and `extra` files.
fn bench_initrd(
    vm_dir: &Path,
    name: &str,
    kernel: &kernel::Kernel,
    guest_bins: &[PathBuf],
    suite: &str,
    extra: &[(&str, &str)],
) -> Result<PathBuf> {
    let initrd = vm_dir.join(format!("initrd-{name}.cpio"));
    let mut files = vec![
        ("/init", INIT),
        ("/lib/vm/lib.sh", LIB),
        ("/lib/vm/run-jobs.sh", RUN_JOBS),
        ("/lib/vm/devices.sh", DEVICES_SH),
        ("/lib/vm/suite.sh", suite),
    ];
    files.extend_from_slice(extra);
    initramfs::build(
        &vm_dir.join(format!("stage-{name}")),
        &initrd,
        &initramfs::Spec {
            host_bins: HOST_BINS,
            built_bins: guest_bins,
            copies: &[],
            modules: &kernel.modules,
            files: &files,
        },
    )?;
    Ok(initrd)
}

/// Now, as the generated sections date themselves.
fn utc_now() -> String {
    Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The benchmark guest: kernel and initramfs, booted once per job set.
pub(super) struct Guest<'a> {
    pub(super) vm_dir: &'a Path,
    pub(super) vmlinuz: &'a Path,
    pub(super) initrd: &'a Path,
}

/// How long a boot may take, and how long its console may stay silent.
pub(super) struct Limits {
    pub(super) total_s: u64,
    pub(super) quiet: Option<Duration>,
}

impl Guest<'_> {
    pub(super) fn boot(
        &self,
        name: &str,
        memory: &str,
        cmdline: &str,
        limits: Limits,
    ) -> Result<qemu::BootResult> {
        let log = self.vm_dir.join(format!("console-{name}.log"));
        let r = qemu::boot(&qemu::Boot {
            name,
            vmlinuz: self.vmlinuz,
            initrd: self.initrd,
            memory,
            cpus: 2,
            cmdline_extra: cmdline,
            timeout: Duration::from_secs(limits.total_s),
            idle_timeout: limits.quiet,
            log: &log,
        })?;
        println!(
            "   {name}: guest up after {:.1} s{}; console log {}",
            r.boot_secs,
            if r.timed_out {
                ", TIMED OUT"
            } else if r.went_quiet {
                ", HUNG (console silent)"
            } else {
                ""
            },
            log.display()
        );
        Ok(r)
    }
}

fn install_rublk(root: &Path) -> Result<PathBuf> {
    crate::cargo_install_pinned(
        &root.join("target/bench-tools"),
        "rublk",
        "rublk",
        RUBLK_VERSION,
    )
}

pub(super) fn qemu_version() -> String {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "qemu (version unknown)".into())
}

struct Report<'a> {
    samples: &'a [Sample],
    unreadable: usize,
    swaps: &'a [SwapRun],
    options: &'a Options,
    qemu: &'a str,
    minutes: f64,
}

const BEGIN: &str = "<!-- cargo xtask bench: begin (generated; edits here are overwritten) -->";
const END: &str = "<!-- cargo xtask bench: end -->";

impl Report<'_> {
    fn write(&self, root: &Path) -> Result<()> {
        let docs = root.join("docs");
        let svg = docs.join("bench-vm.svg");
        if !self.samples.is_empty() {
            report::draw_ratios(self.samples, &svg)?;
        }
        let section = self.markdown();
        let path = docs.join("benchmarks.md");
        crate::docs::splice(&path, BEGIN, END, &section)?;
        println!("{section}");
        println!("== wrote {} and {}", path.display(), svg.display());
        Ok(())
    }

    fn markdown(&self) -> String {
        let host = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let date = utc_now();
        let o = self.options;
        let mut md = format!(
            "{BEGIN}\n## Side by side in one VM boot (`cargo xtask bench`)\n\n\
             Generated {date} by `cargo xtask bench --secs {} --rounds {}` in {:.1} minutes on \
             {host} ({} cores); {}, single-threaded TCG, 2 vCPUs, Debian's 6.12.107 cloud kernel. \
             **Emulated:** every instruction is emulated, so absolute figures say nothing about real \
             hardware; read the ratios, which compare devices in the same boot. Each device holds \
             2 GiB; fio (libaio, O_DIRECT) runs on vCPU 0 and each server's threads are pinned to \
             vCPU 1; ublk servers run 1 queue of depth 128. Round 1 runs every job on each device in \
             turn; later rounds repeat the fio jobs on vramblk, rublk null and NBD (the devices the \
             targets compare) in reverse order to show the spread. Every device runs faster in later \
             rounds (TCG's translation cache warming up), so ratios are taken within a round and \
             then averaged. The jobs are `bench/jobs/run-jobs.sh`, which runs against any block \
             device. \"vs NBD\" is how many times better than NBD (above 1 is better, for latency \
             too). \
             dd writes zeros (as nbd-vram's README does), which zram stores as same-filled pages \
             without compressing, so zram's dd figures flatter it.\n\n\
             ![speed-up over NBD](bench-vm.svg)\n\n",
            o.secs,
            o.rounds,
            self.minutes,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            self.qemu,
        );
        if self.unreadable > 0 {
            md.push_str(&format!(
                "{} job record(s) could not be read from the console and are missing below.\n\n",
                self.unreadable
            ));
        }
        if !self.samples.is_empty() || !self.swaps.is_empty() {
            md.push_str("### Targets (issue 6)\n\n");
            md.push_str(&report::targets(self.samples, self.swaps));
            md.push('\n');
        }
        if !self.samples.is_empty() {
            md.push_str("### Jobs\n\n");
            md.push_str(&report::job_tables(self.samples, o.rounds));
        }
        if !self.swaps.is_empty() {
            md.push_str(
                "### Swap under memory pressure\n\n\
                 One boot per device: 1 GiB RAM with 256 huge pages (512 MiB) reserved at boot, the \
                 device (512 MiB) as the only swap at priority 100, then `memcheck` writes a working \
                 set of MemAvailable-at-boot + 256 MiB of incompressible, page-unique data and reads \
                 every byte back, twice, while `latprobe` (a small unrelated task) touches its own \
                 1 MiB and reads /proc/meminfo every 50 ms. vramblk's host store sits on the reserved \
                 huge pages, outside the pressured pool, as VRAM would; nbdkit's memory, zram's pool \
                 and rublk's tmpfs file all live in the pressured RAM, which is what using them as \
                 swap means. A run counts as hung when swap-in and swap-out have not moved \
                 for 20 s while the load runs, or when the guest's console (a heartbeat every 5 s) \
                 falls silent for 20 s.\n\n",
            );
            md.push_str(&report::swap_table(self.swaps));
            md.push('\n');
        }
        md.push_str(END);
        md
    }
}
