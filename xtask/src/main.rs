//! `cargo xtask ...`: the project's automation (cargo-xtask convention).
//!
//! - `test`: unit tests, the committed PTX against its CUDA C (where
//!   NVRTC can be fetched), `systemd-analyze verify` on the units, the cuda
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
//! - `corpus`: a corpus of real swap content and how it compresses page
//!   by page on the CPU (issue 18).
//! - `ptx`: the GPU kernels' PTX from their CUDA C (NVRTC from PyPI),
//!   committed so building vramblk needs no CUDA.
//! - `deb`: the Debian package (cargo-deb, installed under target/tools
//!   when missing), checked: its files, conffile and man pages.
//! - `install` / `uninstall`: the binary, systemd units, udev rule and
//!   default config (`--dry-run` prints, `--root DIR` stages).

mod bench;
mod bench_engine;
mod corpus;
mod deb;
mod deps;
mod docs;
mod initramfs;
mod install;
mod kernel;
mod ptx;
mod qemu;
mod suite;
mod tidy;
mod units;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

/// vramblk's automation: `cargo xtask <task>`.
#[derive(Debug, Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub task: Task,
}

#[derive(Debug, Subcommand)]
pub enum Task {
    /// The README's test command: unit tests, `systemd-analyze verify`,
    /// the cuda store's checks on the stand-in libcuda, the VM suite.
    Test,
    /// `cargo test` for the workspace.
    UnitTest,
    /// The VM suite alone (VRAMBLK_VM_KERNEL=6.12|7.3|6.1 picks the
    /// kernel series, VRAMBLK_VM_SUITE=io|swap|crash|systemd|package|... one boot).
    VmTest,
    /// Fetch the VM kernel (if not cached) and print its release.
    VmKernel,
    /// vramblk beside NBD, zram and rublk in one VM boot; rewrites
    /// docs/benchmarks.md's VM part.
    Bench(bench::Options),
    /// Batch commands (UBLK_F_BATCH_IO) beside per-tag commands in one VM
    /// boot of a 7.x kernel; rewrites that table of docs/benchmarks.md.
    BenchCommands(bench::commands::Options),
    /// The CUDA store's GPU checks and benchmark (engine-bench) here, or
    /// record a report from elsewhere; rewrites docs/benchmarks.md's GPU part.
    BenchEngine(bench_engine::Options),
    /// The Debian package (target/debian/, or target/debian/VERSION/ with
    /// --deb-version), checked.
    Deb(deb::Options),
    /// A corpus of real swap content (programs' resident anonymous pages,
    /// random pages) under target/corpus, and how it compresses page by
    /// page on the CPU (same-filled, LZ4, zstd); `--report` writes the table
    /// into docs/benchmarks.md.
    Corpus(corpus::Options),
    /// The GPU kernels' PTX (cuda-store/kernels/*.ptx) from their CUDA C,
    /// with NVRTC fetched from PyPI into target/nvrtc; `--check` compares.
    Ptx(ptx::Options),
    /// Install the binary, units, udev rule and default config under /usr/local and /etc.
    Install(install::Options),
    /// Remove what `install` installed (keeps /etc/vramblk.toml).
    Uninstall(install::Options),
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli.task) {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Test => {
            unit_test()?;
            ptx::check_where_possible(&root()?)?;
            deps::ensure()?;
            units::verify(&root()?)?;
            units::stub_checks(&root()?)?;
            suite::run_all(&root()?)
        }
        Task::UnitTest => unit_test(),
        Task::VmKernel => {
            let k = kernel::fetch(&root()?.join("target/vm"))?;
            println!("{} {}", k.release, k.vmlinuz.display());
            Ok(())
        }
        Task::VmTest => suite::run_all(&root()?),
        Task::Bench(o) => bench::run(&root()?, &o),
        Task::BenchCommands(o) => bench::commands::run(&root()?, &o),
        Task::Install(o) => install::install(&root()?, &o),
        Task::Uninstall(o) => install::uninstall(&o),
        Task::Ptx(o) => ptx::run(&root()?, &o),
        Task::Deb(o) => deb::build(&root()?, &o).map(|_| ()),
        Task::BenchEngine(o) => bench_engine::run(&root()?, &o),
        Task::Corpus(o) => corpus::run(&root()?, &o),
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

/// `DIR/bin/BIN` of crate `krate` at `version`, installed there with
/// `cargo install --locked` when what is there does not say that version:
/// the tools xtask runs but no crate here depends on (rublk, cargo-deb).
pub fn cargo_install_pinned(dir: &Path, krate: &str, bin: &str, version: &str) -> Result<PathBuf> {
    let path = dir.join("bin").join(bin);
    let have = Command::new(&path)
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(version));
    if !have {
        println!("== installing {krate} {version} into {}", dir.display());
        sh(Command::new(cargo())
            .args(["install", krate, "--locked", "--version", version, "--root"])
            .arg(dir))?;
    }
    Ok(path)
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
