//! `vramblk del`.

use crate::args::DelArgs;
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};
use vramblk_config::{DeviceRecord, RUN_DIR};
use vramblk_daemon::host::{pid_alive, require_driver, require_root};
use vramblk_daemon::swap;
use vramblk_ublk_target::control::{self, bdev_path, device_ids};

pub fn run(a: &DelArgs) -> Result<()> {
    require_root("del")?;
    require_driver()?;
    let run_dir = Path::new(RUN_DIR);
    // Serialises concurrent dels: the loser finds the device gone and says so.
    let _lock = lock(run_dir)?;
    let ids = match a.id {
        Some(id) => vec![id],
        None => vramblk_records(run_dir).iter().map(|r| r.id).collect(),
    };
    let failed = delete_each(run_dir, &ids);
    if failed > 0 {
        bail!("{failed} device(s) not removed");
    }
    Ok(())
}

/// Deletes each device in turn (see [`delete_one`]), saying why for those
/// that stay; how many stayed.
pub(crate) fn delete_each(run_dir: &Path, ids: &[u32]) -> usize {
    ids.iter()
        .filter(|&&id| match delete_one(run_dir, id) {
            Ok(()) => false,
            Err(e) => {
                eprintln!("vramblk: {e:#}");
                true
            }
        })
        .count()
}

/// The records of the ublk devices vramblk serves (or served: the daemon
/// may be dead), in id order.
pub(crate) fn vramblk_records(run_dir: &Path) -> Vec<DeviceRecord> {
    device_ids()
        .into_iter()
        .filter_map(|id| DeviceRecord::load(run_dir, id))
        .collect()
}

/// The record of device `id`, which must exist and be vramblk's.
pub(crate) fn vramblk_record(run_dir: &Path, id: u32) -> Result<DeviceRecord> {
    if !device_ids().contains(&id) {
        bail!("there is no ublk device {id}");
    }
    DeviceRecord::load(run_dir, id).with_context(|| {
        format!(
            "{} was not added by vramblk (no record in {})",
            bdev_path(id),
            run_dir.display()
        )
    })
}

pub(crate) fn delete_one(run_dir: &Path, id: u32) -> Result<()> {
    if !device_ids().contains(&id) {
        DeviceRecord::remove(run_dir, id);
        bail!("there is no ublk device {id}");
    }
    let path = bdev_path(id);
    if swap::find(&path).is_some() {
        swap::disable(&path)?;
    }
    let record = DeviceRecord::load(run_dir, id);
    control::delete_device(id)?;
    DeviceRecord::remove(run_dir, id);
    if let Some(r) = record {
        wait_memory_freed(&path, &r);
    }
    println!("removed {path}");
    Ok(())
}

/// Longest `del` waits for the device's processes to free its memory.
const FREE_WAIT: Duration = Duration::from_secs(30);

/// Waits until the device's server and supervisor have exited: they hold
/// its memory (huge pages, VRAM) until then, and a device added right
/// after `del` (`down` then `up`) would otherwise find it still taken.
/// The server erases VRAM first, which is why this can take a moment.
fn wait_memory_freed(path: &str, r: &DeviceRecord) {
    let me = std::process::id();
    let holders: Vec<u32> = [Some(r.pid), r.holder_pid]
        .into_iter()
        .flatten()
        .filter(|&p| p != me)
        .collect();
    let start = Instant::now();
    while holders.iter().any(|&p| pid_alive(p)) {
        if start.elapsed() > FREE_WAIT {
            log::warn!(
                "{path}: removed, but its server or supervisor ({holders:?}) has not exited after {} s; \
                 its memory is freed when they do",
                FREE_WAIT.as_secs()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    log::debug!(
        "{path}: its processes exited {} ms after the removal",
        start.elapsed().as_millis()
    );
}

pub(crate) fn lock(run_dir: &Path) -> Result<File> {
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let path = run_dir.join("lock");
    let f = File::create(&path).with_context(|| format!("opening {}", path.display()))?;
    // A POSIX record lock, not flock: `up` forks supervisors while it
    // holds the lock, and a forked child would share an flock (it belongs
    // to the open file) and hold it for as long as the device lives;
    // record locks belong to the process and are not inherited. libc:
    // rustix's locks are flock and open-file-description ones, both shared
    // with such a child.
    // SAFETY: a zeroed flock struct is valid; fcntl on an fd we own.
    let r = unsafe {
        let mut fl: libc::flock = std::mem::zeroed();
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        libc::fcntl(f.as_raw_fd(), libc::F_SETLKW, &fl)
    };
    if r != 0 {
        bail!(
            "locking {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(f)
}
