//! Booting the guest under qemu TCG and collecting what it prints.

use anyhow::{Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct Boot<'a> {
    pub name: &'a str,
    pub vmlinuz: &'a Path,
    pub initrd: &'a Path,
    pub memory: &'a str,
    pub cpus: u32,
    pub cmdline_extra: &'a str,
    pub timeout: Duration,
    /// Stop early when the guest prints nothing for this long after it is
    /// up (a hung guest); None waits for `timeout`.
    pub idle_timeout: Option<Duration>,
    pub log: &'a Path,
}

pub struct BootResult {
    pub lines: Vec<String>,
    pub boot_secs: f64,
    pub timed_out: bool,
    /// Stopped by `idle_timeout`.
    pub went_quiet: bool,
}

/// Boots, echoes the console with a prefix, and returns every line. KVM
/// cannot boot a stock kernel on these hosts, so this is single-threaded
/// TCG (multi-threaded TCG panicked once in ~110 boots).
pub fn boot(b: &Boot) -> Result<BootResult> {
    let append = format!(
        "console=ttyS0 rootfstype=ramfs panic=-1 loglevel=4 {}",
        b.cmdline_extra
    );
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg,thread=single",
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .args(["-smp", &b.cpus.to_string(), "-m", b.memory])
        .arg("-kernel")
        .arg(b.vmlinuz)
        .arg("-initrd")
        .arg(b.initrd)
        .args(["-append", &append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = std::fs::File::create(b.log)?;
    let start = Instant::now();
    let mut lines = Vec::new();
    let mut boot_secs = 0.0;
    let mut timed_out = false;
    let mut went_quiet = false;
    let mut last_line = Instant::now();
    loop {
        let left = b.timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            timed_out = true;
            let _ = child.kill();
            break;
        }
        if let Some(idle) = b.idle_timeout {
            if boot_secs > 0.0 && last_line.elapsed() > idle {
                went_quiet = true;
                let _ = child.kill();
                break;
            }
        }
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(line) => {
                last_line = Instant::now();
                let line = line.trim_end_matches('\r').to_string();
                writeln!(log, "{line}")?;
                if line.contains("VM-READY") && boot_secs == 0.0 {
                    boot_secs = start.elapsed().as_secs_f64();
                }
                if is_interesting(&line) {
                    println!("[{}] {line}", b.name);
                }
                let done = line.contains("SUITE-DONE");
                lines.push(line);
                if done {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if child.try_wait()?.is_some() {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // Give the guest a moment to power off, then make sure.
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    Ok(BootResult {
        lines,
        boot_secs,
        timed_out,
        went_quiet,
    })
}

fn is_interesting(line: &str) -> bool {
    [
        "PASS",
        "FAIL",
        "INFO",
        "VM-READY",
        "SUITE-DONE",
        "Kernel panic",
        "Oops",
        "BUG:",
        "Call Trace",
        "hung_task",
        "Out of memory",
    ]
    .iter()
    .any(|k| line.contains(k))
}
