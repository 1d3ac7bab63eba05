//! `cargo xtask ...`: the project's automation (cargo-xtask convention).
//!
//! - `test`: unit tests, `systemd-analyze verify` on the units, the cuda
//!   store's checks on a stand-in libcuda, then the VM suite (the README's
//!   test command).
//! - `unit-test`: `cargo test` for the workspace.
//! - `vm-test`: the VM suite alone: boots Debian's cloud kernel (the newest
//!   build of the series `VRAMBLK_VM_KERNEL` names, 6.12 by default) under
//!   qemu TCG with a busybox initramfs holding the release binaries and
//!   runs the kernel-path checks.
//! - `vm-kernel`: fetches that kernel (if not cached) and prints its release.
//! - `bench`: vramblk beside NBD, zram and rublk in one VM boot, and each
//!   as swap under memory pressure; rewrites docs/benchmarks.md's VM part.
//! - `bench-engine`: the CUDA store's GPU checks and benchmark (engine-bench)
//!   here when there is a GPU, or `--report FILE` from a run elsewhere;
//!   rewrites docs/benchmarks.md's GPU part.
//! - `deb`: the Debian package (cargo-deb, installed under target/tools
//!   when missing), checked: its files, conffile and man pages.
//! - `install` / `uninstall`: the binary, systemd units, udev rule and
//!   default config (`--dry-run` prints, `--root DIR` stages).

mod bench;
mod bench_engine;
mod deb;
mod deps;
mod docs;
mod initramfs;
mod install;
mod kernel;
mod qemu;
mod suite;
mod tidy;
mod units;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let task = args.first().map(String::as_str).unwrap_or("help");
    match task {
        "test" => {
            unit_test()?;
            deps::ensure()?;
            units::verify(&root()?)?;
            units::stub_checks(&root()?)?;
            suite::run_all(&root()?)
        }
        "unit-test" => unit_test(),
        "vm-kernel" => {
            let k = kernel::fetch(&root()?.join("target/vm"))?;
            println!("{} {}", k.release, k.vmlinuz.display());
            Ok(())
        }
        "vm-test" => suite::run_all(&root()?),
        "bench" => bench::run(&root()?, &bench::Options::parse(&args[1..])?),
        "install" => install::install(&root()?, &install::Options::parse(&args[1..])?),
        "uninstall" => install::uninstall(&install::Options::parse(&args[1..])?),
        "deb" => deb::build(&root()?, &deb::Options::parse(&args[1..])?).map(|_| ()),
        "bench-engine" => bench_engine::run(&root()?, &bench_engine::Options::parse(&args[1..])?),
        _ => {
            eprintln!("usage: cargo xtask <test|unit-test|vm-test|vm-kernel|bench [--secs N] [--rounds N] [--no-swap] [--no-jobs]|bench-engine [--report FILE] [--size GIB] [--secs N]|deb [--deb-version V]|install [--dry-run] [--root DIR] [--no-build]|uninstall [--dry-run] [--root DIR]>");
            if task == "help" || task == "--help" {
                Ok(())
            } else {
                bail!("unknown task {task:?}")
            }
        }
    }
}

/// The workspace root (xtask lives one level down).
pub fn root() -> Result<PathBuf> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    Ok(here
        .parent()
        .context("xtask has no parent dir")?
        .to_path_buf())
}

fn unit_test() -> Result<()> {
    println!("== unit tests: cargo test --workspace");
    sh(Command::new(cargo())
        .args(["test", "--workspace"])
        .current_dir(root()?))
}

pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// `cargo build --release` of the workspace at `root` with `args` (which
/// packages and binaries).
pub fn build_release(root: &Path, args: &[&str]) -> Result<()> {
    sh(Command::new(cargo())
        .args(["build", "--release"])
        .args(args)
        .current_dir(root))
}

/// Runs a command, failing with its name when it fails.
pub fn sh(cmd: &mut Command) -> Result<()> {
    let name = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {name}"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}
