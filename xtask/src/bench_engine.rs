//! `cargo xtask bench-engine`: the CUDA store's checks and benchmark
//! (engine-bench: the real queue engine and store under a synthetic,
//! ublk-shaped load). Runs it here when this machine has a GPU; otherwise
//! leaves the binary to carry to one. Either way a passing report lands in
//! docs/benchmarks.md between its markers.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

const BEGIN: &str =
    "<!-- cargo xtask bench-engine: begin (generated; edits here are overwritten) -->";
const END: &str = "<!-- cargo xtask bench-engine: end -->";

/// engine-bench's exit status when there is no usable GPU.
const SKIPPED: i32 = 77;

/// `bench-engine` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Record a report engine-bench wrote on another machine (`--out`)
    /// instead of running it here.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Each store's size in GiB.
    #[arg(long = "size", value_name = "GIB", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    size_gib: u32,
    /// Seconds per shape.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    secs: u32,
}

pub fn run(root: &Path, o: &Options) -> Result<()> {
    if let Some(report) = &o.report {
        return record(root, report);
    }
    println!("== building engine-bench (release)");
    crate::build_release(root, &["-p", "vramblk-bench"])?;
    let dir = root.join("target/bench-engine");
    std::fs::create_dir_all(&dir)?;
    let bin = dir.join("engine-bench");
    std::fs::copy(root.join("target/release/engine-bench"), &bin)
        .context("copying engine-bench")?;
    let out = dir.join("engine.md");
    let size = o.size_gib.to_string();
    let secs = o.secs.to_string();
    println!("== engine-bench --size {size} --secs {secs}");
    let status = Command::new(&bin)
        .args(["--size", &size, "--secs", &secs, "--out"])
        .arg(&out)
        .status()
        .context("starting engine-bench")?;
    match status.code() {
        Some(0) => record(root, &out),
        Some(SKIPPED) => {
            println!(
                "bench-engine SKIPPED: no usable GPU on this machine (reason above); nothing measured.\n\
                 To measure on a GPU machine: copy {} there, run\n  \
                 ./engine-bench --size {size} --secs {secs} --out engine.md\n\
                 bring engine.md back and run\n  cargo xtask bench-engine --report engine.md",
                bin.display()
            );
            Ok(())
        }
        _ => bail!("engine-bench failed ({status}); docs left as they were"),
    }
}

/// Checks a report and writes it into docs/benchmarks.md.
fn record(root: &Path, report: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(report).with_context(|| format!("reading {}", report.display()))?;
    check_report(&text)?;
    let section = format!(
        "{BEGIN}\n## CUDA store, on the GPU machine (`cargo xtask bench-engine`)\n\n\
         engine-bench drives the real `QueueEngine` and `CudaStore` with a synthetic, ublk-shaped \
         load (each queue a thread keeping `depth` tags busy; the GPU machine has no ublk), in \
         each copy mode: `auto` (the default: a queue round of 4 or more requests goes out as \
         one launch of the copy kernel, fewer go to the copy engines), `dma` (copy engines only, \
         one async copy per request) and `kernel-always` (the kernel for every round, to show \
         why auto leaves lone requests to the copy engines). The baseline, measured in the \
         same process, is nbd-vram's copy shape: one thread, one synchronous `cuMemcpy` per \
         4 KiB from a pageable buffer; it leaves out NBD's socket hop and bounce buffer (260-335 \
         us per request by nbd-vram's README), so ratios against it understate the gain over \
         nbd-vram itself. Latency is from enqueue to completion seen by the queue. Each shape \
         runs for `--secs` seconds (the command is on the first line below); runs differ by up to ~15%.\n\n{}\n{END}",
        text.trim_end()
    );
    let path = root.join("docs/benchmarks.md");
    crate::docs::splice(&path, BEGIN, END, &section)?;
    println!("== wrote the engine-bench report into {}", path.display());
    Ok(())
}

/// A report worth recording: engine-bench's shape, every check passed.
fn check_report(text: &str) -> Result<()> {
    if !text.starts_with("GPU: ") || !text.contains("#### Checks") {
        bail!("not an engine-bench report (it starts with \"GPU: \" and has a Checks part)");
    }
    let failed: Vec<&str> = text.lines().filter(|l| l.starts_with("- FAIL")).collect();
    if !failed.is_empty() {
        bail!(
            "the report has failed checks; not recorded:\n{}",
            failed.join("\n")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_reject() {
        use clap::Parser;
        let a = |v: &[&str]| {
            crate::Cli::try_parse_from(["xtask", "bench-engine"].iter().chain(v)).map(|c| {
                match c.task {
                    crate::Task::BenchEngine(o) => o,
                    other => panic!("{other:?}"),
                }
            })
        };
        let o = a(&["--report", "x.md", "--secs", "2"]).unwrap();
        assert_eq!(o.report.as_deref(), Some(Path::new("x.md")));
        assert_eq!((o.secs, o.size_gib), (2, 4));
        assert!(a(&["--secs", "0"]).is_err());
        assert!(a(&["--secs"]).is_err());
        assert!(a(&["--fast"]).is_err());
    }

    #[test]
    fn only_passing_reports_are_recorded() {
        let good = "GPU: H100\n\n#### Checks\n\n- PASS a\n";
        assert!(check_report(good).is_ok());
        assert!(check_report("GPU: H100\n\n#### Checks\n\n- FAIL a\n").is_err());
        assert!(check_report("SKIPPED: no GPU").is_err());
    }
}
