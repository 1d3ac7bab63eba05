//! Preconditions of the host: root, the ublk driver.

use anyhow::{bail, Result};

pub fn require_root(what: &str) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
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

/// `pid` as rustix takes it; None for 0 and for what no pid can be.
fn rustix_pid(pid: u32) -> Option<rustix::process::Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
}

/// This process's pid.
pub fn own_pid() -> u32 {
    rustix::process::getpid().as_raw_nonzero().get() as u32
}

/// Sends `signal` to `pid`; whether it was delivered.
pub fn send_signal(pid: u32, signal: rustix::process::Signal) -> bool {
    rustix_pid(pid).is_some_and(|p| rustix::process::kill_process(p, signal).is_ok())
}

/// Whether a process with this pid is running: it exists and is not a
/// zombie (a dead holder whose parent has not reaped it yet is dead).
pub fn pid_alive(pid: u32) -> bool {
    let exists = rustix_pid(pid).is_some_and(|p| rustix::process::test_kill_process(p).is_ok());
    exists
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !is_zombie(&s))
            .unwrap_or(true)
}

/// The live (not zombie) children of `pid`, from each process's /proc
/// stat line.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&c| {
            std::fs::read_to_string(format!("/proc/{c}/stat"))
                .is_ok_and(|s| !is_zombie(&s) && parent_in_stat(&s) == Some(pid))
        })
        .collect()
}

/// A /proc/PID/stat line after the command name, which is in parentheses
/// and may itself hold any byte: "STATE PPID ...".
fn after_command(stat: &str) -> Option<&str> {
    stat.rsplit_once(')').map(|(_, rest)| rest)
}

/// Whether a /proc/PID/stat line is a zombie's.
fn is_zombie(stat: &str) -> bool {
    after_command(stat).is_some_and(|rest| rest.trim_start().starts_with('Z'))
}

/// The parent pid in a /proc/PID/stat line.
fn parent_in_stat(stat: &str) -> Option<u32> {
    after_command(stat)?.split_whitespace().nth(1)?.parse().ok()
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

    #[test]
    fn the_parent_pid_comes_after_the_command_name() {
        assert_eq!(parent_in_stat("123 (vramblk) S 77 123 123 0"), Some(77));
        assert_eq!(parent_in_stat("9 (a b) c) R 1 9 9"), Some(1));
        assert_eq!(parent_in_stat("garbage"), None);
    }

    #[test]
    fn a_spawned_child_is_found_and_a_reaped_one_is_not() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("spawning sleep");
        let me = std::process::id();
        assert!(children_of(me).contains(&child.id()));
        let _ = child.kill();
        let _ = child.wait();
        assert!(!children_of(me).contains(&child.id()));
    }
}
