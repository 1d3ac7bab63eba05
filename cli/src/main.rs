//! `vramblk`: turns idle GPU memory into a ublk block device, above all a
//! swap device.

mod add;
mod args;
mod config;
mod daemon;
mod del;
mod host;
mod list;
mod memory;
mod recover;
mod server;
mod signals;
mod supervise;
mod swap;

use args::{Cli, Command};
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Add(a) => add::run(&a),
        Command::Del(d) => del::run(&d),
        Command::List => list::run(),
        Command::Recover(r) => recover::run(&r),
        Command::Features => list::features(),
        Command::Config(args::ConfigCommand::Check { path }) => config::check(&path),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vramblk: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr in the foreground; a daemon points them at its log file.
pub(crate) fn init_logging(target: env_logger::Target) {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(target)
        .format_timestamp_millis()
        .try_init();
}
