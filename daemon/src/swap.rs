//! Swap on the device: mkswap/swapon through util-linux, swapoff directly.

use anyhow::{bail, Context, Result};
use std::ffi::CString;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// How often a swap device whose server (or adoption) kept failing is
/// tried again once its give-up is due, and how many more tries it gets
/// (five minutes of them) before it is given up: its removal fails every
/// swapped page's read (supervise.rs `next_step`, holder.rs).
pub const KEEP_RETRY: Duration = Duration::from_secs(10);
pub const KEEP_RETRIES: u32 = 30;

/// One line of /proc/swaps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveSwap {
    pub path: String,
    pub size_kib: u64,
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
                size_kib: f.get(2)?.parse().ok()?,
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

/// RAM that must stay free after a swapoff.
fn swapoff_margin(mem_total: u64) -> u64 {
    vramblk_host_store::MemInfo {
        mem_total,
        ..Default::default()
    }
    .margin()
}

/// Why a swapoff of `used` bytes would not fit, if it would not: its pages
/// must go to RAM (MemAvailable) or to other swap areas, with a margin
/// left. The kernel's own check is far looser (it lets swapoff go ahead
/// and the OOM killer pick victims), hence this one.
pub fn swapoff_shortfall(
    used: u64,
    mem_available: u64,
    other_swap_free: u64,
    mem_total: u64,
) -> Option<String> {
    let room = (mem_available + other_swap_free).saturating_sub(swapoff_margin(mem_total));
    // Under 1 MiB, MiB would say "0" of pages that still do not fit.
    let used_text = if used < 1 << 20 {
        format!("{} KiB", used >> 10)
    } else {
        format!("{} MiB", used >> 20)
    };
    (used > room).then(|| {
        format!(
            "its {used_text} of swapped pages do not fit in the {} MiB that RAM ({} MiB available) and other swap ({} MiB free) can take while keeping {} MiB free",
            room >> 20,
            mem_available >> 20,
            other_swap_free >> 20,
            swapoff_margin(mem_total) >> 20
        )
    })
}

/// swapoff, unless RAM and the other swap areas cannot take the device's
/// pages back: then it says so and leaves the device serving. Nothing is
/// ever dropped: the kernel reads every swapped page back first.
pub fn disable(path: &str) -> Result<()> {
    let swaps = active();
    if let Some(me) = swaps.iter().find(|s| s.path == path) {
        let other_free: u64 = swaps
            .iter()
            .filter(|s| s.path != path)
            .map(|s| s.size_kib.saturating_sub(s.used_kib) << 10)
            .sum();
        let mem = vramblk_host_store::MemInfo::read().unwrap_or_default();
        if let Some(why) = swapoff_shortfall(
            me.used_kib << 10,
            mem.mem_available,
            other_free,
            mem.mem_total,
        ) {
            bail!("not swapping off {path}: {why}; the device is left serving (free memory, add other swap, or try again later)");
        }
    }
    disable_now(path)
}

/// swapoff without the room check; the kernel refuses with ENOMEM only
/// when RAM and swap together cannot hold the pages.
fn disable_now(path: &str) -> Result<()> {
    let c = CString::new(path).context("device path has a NUL byte")?;
    // libc: rustix has no swapoff.
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
    fn swapoff_needs_room_in_ram_and_other_swap() {
        const M: u64 = 1 << 20;
        let total = 1000 * M; // margin: 64 + 20 = 84 MiB
        assert_eq!(swapoff_shortfall(100 * M, 500 * M, 0, total), None);
        assert_eq!(swapoff_shortfall(400 * M, 200 * M, 300 * M, total), None);
        let why = swapoff_shortfall(500 * M, 300 * M, 100 * M, total).unwrap();
        assert!(why.contains("500 MiB"), "{why}");
        assert!(why.contains("316 MiB"), "{why}");
        // Exactly at the margin still fits; a page more does not.
        assert_eq!(swapoff_shortfall(416 * M, 500 * M, 0, total), None);
        assert!(swapoff_shortfall(416 * M + 4096, 500 * M, 0, total).is_some());
        assert_eq!(swapoff_shortfall(0, 0, 0, total), None);
        let why = swapoff_shortfall(300 << 10, 0, 0, total).unwrap();
        assert!(why.contains("its 300 KiB of swapped pages"), "{why}");
    }

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
                size_kib: 524284,
                used_kib: 1024,
                priority: 1000
            }
        );
        assert_eq!(s[1].priority, -2);
    }
}
