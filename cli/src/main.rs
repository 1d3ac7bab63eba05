//! `vramblk`: turns idle GPU memory into a ublk block device, above all a
//! swap device.

mod add;
mod args;
mod config;
mod del;
mod generate;
mod gpu;
mod list;
mod prometheus;
mod recover;
mod release;
mod service;
mod sleep;
mod status;
mod status_output;
mod up;
mod upgrade;

use args::{Cli, Command};
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Number GPUs in PCI bus order, as NVML and nvidia-smi do, so `--gpu N`
    // and the service's NVML readings mean the same GPU. Set before any
    // thread exists and before CUDA reads it (at cuInit, in the server).
    if std::env::var_os("CUDA_DEVICE_ORDER").is_none() {
        std::env::set_var("CUDA_DEVICE_ORDER", "PCI_BUS_ID");
    }
    let cli = Cli::parse();
    if prints_only(&cli.command) {
        end_quietly_when_the_reader_goes();
    }
    let result = match cli.command {
        Command::Add(a) => add::run(&a),
        Command::Del(d) => del::run(&d),
        Command::List => list::run(),
        Command::Recover(r) => recover::run(&r),
        Command::Upgrade(u) => upgrade::run(&u),
        Command::ResumeSupervisor { run_dir, state } => {
            vramblk_daemon::resume::resume_supervisor(&run_dir, &state)
        }
        Command::Features => list::features(),
        Command::Gpus(g) => status::gpus(g.json, g.cuda),
        Command::Config(args::ConfigCommand::Check { path }) => config::check(&path),
        Command::Up(c) => up::up(&c.config),
        Command::Down => up::down(),
        Command::Service(s) => service::run(&service::ServiceArgs {
            config: s.config,
            sysfs: s.sysfs,
            free_vram_from: s.free_vram_from,
        }),
        Command::Status {
            json,
            prometheus,
            output,
        } => {
            let format = match (json, prometheus) {
                (true, _) => status_output::Format::Json,
                (_, true) => status_output::Format::Prometheus,
                _ => status_output::Format::Text,
            };
            status_output::run(format, output.as_deref())
        }
        Command::Completions { shell } => generate::completions(shell),
        Command::Manpages { dir } => generate::manpages(&dir).map(|files| {
            for f in files {
                println!("{}", dir.join(f).display());
            }
        }),
        Command::Release { id, to } => release::run(id, to.as_deref()),
        Command::FlipBit { id, offset } => vramblk_daemon::vram_control::flip_bit(id, offset),
        Command::Sleep { step } => match step {
            args::SleepStep::Prepare => sleep::prepare(),
            args::SleepStep::Resume => sleep::resume(),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vramblk: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether `command`'s work is what it prints (a listing, a status, a
/// script): nothing it starts or asks of a server is left half done if it
/// ends as its output's reader goes away.
fn prints_only(command: &Command) -> bool {
    matches!(
        command,
        Command::List
            | Command::Features
            | Command::Gpus(_)
            | Command::Config(_)
            | Command::Status { .. }
            | Command::Completions { .. }
            | Command::Manpages { .. }
    )
}

/// Restores SIGPIPE's default action, as other Unix tools have it:
/// `vramblk status | head -1` then ends quietly when head has its line.
/// Rust's runtime ignores SIGPIPE, so a write to a closed pipe fails and
/// println! panics on that ("failed printing to stdout: Broken pipe").
/// Only for commands that print: a command that forks a daemon (which must
/// never die of a reader gone) or writes a request to a server's socket
/// (whose EPIPE is an error it reports) keeps the runtime's way.
fn end_quietly_when_the_reader_goes() {
    // libc: rustix offers signal dispositions only to runtimes that replace
    // the C library. SAFETY: SIG_DFL for SIGPIPE, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
