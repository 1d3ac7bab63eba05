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
