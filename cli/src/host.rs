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

/// The driver, with every feature a device needs.
pub fn require_ublk_features() -> Result<()> {
    require_driver()?;
    vramblk_ublk_target::control::require_features()?;
    Ok(())
}

pub fn cpu_count() -> u16 {
    std::thread::available_parallelism()
        .map(|n| n.get().min(u16::MAX as usize) as u16)
        .unwrap_or(1)
}

/// Whether a process with this pid is running: it exists and is not a
/// zombie (a dead holder whose parent has not reaped it yet is dead).
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let exists = pid > 0 && pid <= i32::MAX as u32 && unsafe { libc::kill(pid as i32, 0) } == 0;
    exists
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !is_zombie(&s))
            .unwrap_or(true)
}

/// Whether a /proc/PID/stat line is a zombie's: the state follows the
/// command name, which is in parentheses and may itself hold any byte.
fn is_zombie(stat: &str) -> bool {
    stat.rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zombies_are_not_alive() {
        assert!(is_zombie("42 (vramblk) Z 1 42 42"));
        assert!(is_zombie("42 (a) b) Z 1"));
        assert!(!is_zombie("42 (vramblk) S 1 42 42"));
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(0));
    }
}
