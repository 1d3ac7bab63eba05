//! Preconditions of the host: root, the ublk driver.

use anyhow::{bail, Result};

pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("`vramblk {what}` must run as root: ublk devices are created and removed through /dev/ublk-control (try sudo)");
    }
    Ok(())
}

pub fn require_driver() -> Result<()> {
    vramblk_ublk_target::control::require_driver()?;
    Ok(())
}

pub fn cpu_count() -> u16 {
    std::thread::available_parallelism()
        .map(|n| n.get().min(u16::MAX as usize) as u16)
        .unwrap_or(1)
}

/// Whether a process with this pid exists.
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0 && pid <= i32::MAX as u32 && unsafe { libc::kill(pid as i32, 0) } == 0
}
