//! Swap on the device: mkswap/swapon through util-linux, swapoff directly.

use anyhow::{bail, Context, Result};
use std::ffi::CString;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// One line of /proc/swaps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveSwap {
    pub path: String,
    pub used_kib: u64,
    pub priority: i32,
}

pub fn active() -> Vec<ActiveSwap> {
    std::fs::read_to_string("/proc/swaps")
        .map(|t| parse_proc_swaps(&t))
        .unwrap_or_default()
}

pub fn parse_proc_swaps(text: &str) -> Vec<ActiveSwap> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(ActiveSwap {
                path: f.first()?.to_string(),
                used_kib: f.get(3)?.parse().ok()?,
                priority: f.get(4)?.parse().ok()?,
            })
        })
        .collect()
}

pub fn find(path: &str) -> Option<ActiveSwap> {
    active().into_iter().find(|s| s.path == path)
}

/// Waits for the block node (devtmpfs or udev makes it), then mkswap and
/// swapon at `priority`.
pub fn enable(path: &str, priority: i32, discard: bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !Path::new(path).exists() {
        if Instant::now() > deadline {
            bail!("{path} did not appear within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    run(Command::new("mkswap").arg(path))?;
    let mut swapon = Command::new("swapon");
    swapon.arg("--priority").arg(priority.to_string());
    if discard {
        swapon.arg("--discard");
    }
    run(swapon.arg(path))?;
    log::info!("{path}: swap on at priority {priority}");
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .output()
        .with_context(|| format!("running {name} (is util-linux installed?)"))?;
    if !out.status.success() {
        bail!(
            "{name} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// swapoff; the kernel must read every swapped page back into RAM first,
/// and refuses with ENOMEM when RAM cannot hold them.
pub fn disable(path: &str) -> Result<()> {
    let c = CString::new(path).context("device path has a NUL byte")?;
    // SAFETY: c is a valid C string for the duration of the call.
    if unsafe { libc::swapoff(c.as_ptr()) } == 0 {
        log::info!("{path}: swap off");
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOMEM) {
        let used = find(path).map(|s| s.used_kib >> 10).unwrap_or(0);
        bail!("cannot swap off {path}: RAM cannot take back its {used} MiB of swapped pages (ENOMEM); the device is left serving");
    }
    bail!("cannot swap off {path}: {err}; the device is left serving");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_swaps() {
        let t = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
                 /dev/ublkb0                             partition\t524284\t\t1024\t\t1000\n\
                 /dev/zram0 partition 100 0 -2\n";
        let s = parse_proc_swaps(t);
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[0],
            ActiveSwap {
                path: "/dev/ublkb0".into(),
                used_kib: 1024,
                priority: 1000
            }
        );
        assert_eq!(s[1].priority, -2);
    }
}
