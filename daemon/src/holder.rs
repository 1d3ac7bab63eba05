//! Under `vramblk service`, a device's memory has two more holders than its
//! supervisor: the service's main process, and systemd's fd store (which the
//! service fills with FDSTORE=1). So a device outlives its supervisor too:
//!
//! - supervisor (and its server) killed: the service still holds the
//!   memory fds and adopts the device: a new supervisor recovers it from
//!   them;
//! - the service's main process killed as well: systemd restarts it and
//!   hands the fds back (LISTEN_FDS), and it adopts what no supervisor
//!   serves.
//!
//! Neither holder ever touches CUDA: an exported VRAM chunk is an fd like
//! any other, and the memory stays while any process holds it.

use crate::adopt::{adopt_device, still_served};
use crate::announce::SOCKET_ENV;
use crate::host::pid_alive;
use crate::notify::{notify_with_fds, under_systemd};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;
use vramblk_config::DeviceRecord;
use vramblk_store::handoff;
use vramblk_ublk_target::control::{bdev_path, delete_device_nowait, device_ids};

/// Tries at adopting one device before the service gives it up.
const MAX_ADOPT_TRIES: u32 = 3;

/// The fd store's name for chunk `index` of device `id`.
fn fd_name(id: u32, index: usize) -> String {
    format!("vramblk-{id}-{index}")
}

/// The device and chunk an fd store name stands for.
fn parse_fd_name(name: &str) -> Option<(u32, usize)> {
    let (id, index) = name.strip_prefix("vramblk-")?.split_once('-')?;
    Some((id.parse().ok()?, index.parse().ok()?))
}

/// Groups fds handed back by systemd into devices; chunks must run 0..n
/// with none missing, or the device is left out (its layout is unknown).
fn group_by_device(named: Vec<(String, OwnedFd)>) -> BTreeMap<u32, Vec<OwnedFd>> {
    let mut by_id: BTreeMap<u32, BTreeMap<usize, OwnedFd>> = BTreeMap::new();
    for (name, fd) in named {
        match parse_fd_name(&name) {
            Some((id, index)) => {
                by_id.entry(id).or_default().insert(index, fd);
            }
            None => log::warn!("service: ignoring an fd named {name:?} from systemd"),
        }
    }
    by_id
        .into_iter()
        .filter_map(|(id, chunks)| {
            if chunks.keys().copied().eq(0..chunks.len()) {
                Some((id, chunks.into_values().collect()))
            } else {
                log::error!(
                    "service: systemd handed back chunks {:?} of device {id}, not 0..n; not adopting it",
                    chunks.keys().collect::<Vec<_>>()
                );
                None
            }
        })
        .collect()
}

struct HeldDevice {
    fds: Vec<OwnedFd>,
    failed_adoptions: u32,
    /// No adoption is tried before then (a swap device whose adoptions
    /// kept failing: it is retried every [`SWAP_RETRY`], not every tick).
    not_before: Option<Instant>,
}

// How often a swap device's adoption is tried once MAX_ADOPT_TRIES tries
// failed, and how many more tries it gets before it is given up: as a
// supervisor's restarts.
use crate::swap::{KEEP_RETRIES as SWAP_RETRIES, KEEP_RETRY as SWAP_RETRY};

/// The fds the service holds now (see [`held_fds`]).
static HELD_FDS: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

/// The service's copies of every device's memory, for a daemon it forks
/// (a supervisor it starts or adopts with) to close at once: kept, they
/// would hold other devices' VRAM (or memfd) for as long as that daemon
/// lives, so removing those devices would free nothing. What the daemon
/// needs it is handed as fds of its own (`adopt` duplicates them). Empty
/// outside the service.
pub fn held_fds() -> Vec<RawFd> {
    HELD_FDS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The service's holder: the socket supervisors announce on, and the fds
/// it holds per device.
pub struct Holder {
    sock: UnixDatagram,
    path: PathBuf,
    run_dir: PathBuf,
    devices: BTreeMap<u32, HeldDevice>,
}

impl Holder {
    /// Binds the socket, tells future supervisors where it is (through the
    /// environment they inherit), and takes the fds systemd handed back.
    pub fn open(run_dir: &Path, handed_back: Vec<(String, OwnedFd)>) -> Result<Holder> {
        let path = run_dir.join("holder.sock");
        let _ = std::fs::remove_file(&path);
        let sock =
            UnixDatagram::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        sock.set_nonblocking(true)?;
        std::env::set_var(SOCKET_ENV, &path);
        let devices: BTreeMap<u32, HeldDevice> = group_by_device(handed_back)
            .into_iter()
            .map(|(id, fds)| {
                log::info!(
                    "service: systemd handed back the memory of {} ({} fds)",
                    bdev_path(id),
                    fds.len()
                );
                let held = HeldDevice {
                    fds,
                    failed_adoptions: 0,
                    not_before: None,
                };
                (id, held)
            })
            .collect();
        let holder = Holder {
            sock,
            path,
            run_dir: run_dir.to_path_buf(),
            devices,
        };
        holder.publish_fds();
        Ok(holder)
    }

    /// Keeps [`HELD_FDS`] in step with what is held.
    fn publish_fds(&self) {
        let fds = self
            .devices
            .values()
            .flat_map(|d| d.fds.iter().map(|f| f.as_raw_fd()))
            .collect();
        *HELD_FDS.lock().unwrap_or_else(|p| p.into_inner()) = fds;
    }

    /// Every fd held, with its fd store name: what a re-executed service
    /// is handed as LISTEN_FDS (upgrade.rs), as systemd would.
    pub fn named_fds(&self) -> Vec<(String, RawFd)> {
        self.devices
            .iter()
            .flat_map(|(&id, d)| {
                d.fds
                    .iter()
                    .enumerate()
                    .map(move |(i, f)| (fd_name(id, i), f.as_raw_fd()))
            })
            .collect()
    }

    /// Devices whose memory the service holds now.
    pub fn held(&self) -> Vec<u32> {
        self.devices.keys().copied().collect()
    }

    /// Takes announcements, lets go of removed devices' memory, and adopts
    /// devices whose supervisor died.
    pub fn tick(&mut self) {
        self.receive();
        let live = device_ids();
        let ids: Vec<u32> = self.devices.keys().copied().collect();
        for id in ids {
            if !live.contains(&id) {
                self.release(id, "it was removed");
            } else if let Some(record) = self.orphaned(id) {
                self.adopt(record);
            }
        }
    }

    fn receive(&mut self) {
        loop {
            let (text, fds) = match handoff::recv(self.sock.as_fd()) {
                Ok(m) => m,
                Err(vramblk_store::StoreError::Os { source, .. })
                    if source.kind() == std::io::ErrorKind::WouldBlock =>
                {
                    return
                }
                Err(e) => {
                    log::warn!("service: {e}");
                    return;
                }
            };
            let id = text
                .strip_prefix("HOLD ")
                .and_then(|w| w.trim().parse::<u32>().ok());
            match id {
                Some(id) if !fds.is_empty() => self.hold(id, fds),
                _ => log::warn!("service: ignoring {text:?} on {}", self.path.display()),
            }
        }
    }

    /// Holds `fds` for device `id`, replacing what was held, here and in
    /// systemd's fd store.
    fn hold(&mut self, id: u32, fds: Vec<OwnedFd>) {
        if let Some(old) = self.devices.get(&id) {
            if same_files(&old.fds, &fds) {
                // A new supervisor announcing what is held already: no
                // churn in the fd store.
                return;
            }
            forget_in_fd_store(id, old.fds.len());
            self.devices.remove(&id);
        }
        if under_systemd() {
            for (i, fd) in fds.iter().enumerate() {
                let state = format!("FDSTORE=1\nFDNAME={}", fd_name(id, i));
                if let Err(e) = notify_with_fds(&state, &[fd.as_fd()]) {
                    log::warn!(
                        "service: systemd's fd store refused {}: {e}",
                        fd_name(id, i)
                    );
                }
            }
        }
        log::info!(
            "service: holding the memory of {} ({} fds{})",
            bdev_path(id),
            fds.len(),
            if under_systemd() {
                ", also in systemd's fd store"
            } else {
                ""
            }
        );
        self.devices.insert(
            id,
            HeldDevice {
                fds,
                failed_adoptions: 0,
                not_before: None,
            },
        );
        self.publish_fds();
    }

    fn release(&mut self, id: u32, why: &str) {
        if let Some(held) = self.devices.remove(&id) {
            self.publish_fds();
            forget_in_fd_store(id, held.fds.len());
            log::info!(
                "service: letting go of the memory of {} ({why})",
                bdev_path(id)
            );
        }
    }

    /// The record of device `id` if no supervisor holds it (its supervisor
    /// died). No record: being removed right now (the server removes the
    /// record as its last act), or never vramblk's.
    fn orphaned(&self, id: u32) -> Option<DeviceRecord> {
        DeviceRecord::load(&self.run_dir, id).filter(|r| !r.holder_pid.is_some_and(pid_alive))
    }

    fn adopt(&mut self, record: DeviceRecord) {
        let id = record.id;
        let path = bdev_path(id);
        let Some(held) = self.devices.get_mut(&id) else {
            return;
        };
        if held.not_before.is_some_and(|t| Instant::now() < t) {
            return;
        }
        log::warn!(
            "service: the supervisor of {path} (pid {}) is gone; adopting the device from the memory the service holds",
            record.holder_pid.unwrap_or(0)
        );
        let started = Instant::now();
        match adopt_device(&self.run_dir, &record, &held.fds, &held_fds()) {
            Ok(()) => {
                held.failed_adoptions = 0;
                held.not_before = None;
                log::info!(
                    "service: {path} recovered by a new supervisor after {} ms",
                    started.elapsed().as_millis()
                );
            }
            Err(e) if still_served(id) => {
                // A server we may not kill (not our binary) still serves
                // it: nothing is lost yet, so nothing is given up.
                log::warn!("service: not adopting {path} now: {e:#}");
            }
            Err(e) => {
                held.failed_adoptions += 1;
                log::error!(
                    "service: adopting {path} failed (try {} of {MAX_ADOPT_TRIES}): {e:#}",
                    held.failed_adoptions
                );
                if held.failed_adoptions >= MAX_ADOPT_TRIES
                    && held.failed_adoptions < MAX_ADOPT_TRIES + SWAP_RETRIES
                    && crate::swap::find(&path).is_some()
                {
                    // As a supervisor does (supervise.rs `next_step`):
                    // removing a swap device fails the reads of every page
                    // swapped to it; waiting loses nothing if the cause
                    // passes, so it gets five more minutes of tries.
                    log::error!(
                        "service: {path} is swap, and removing it would fail the reads of \
                         every page swapped to it, so it is not given up yet: trying again in \
                         {} s (`vramblk del {id}` takes it away)",
                        SWAP_RETRY.as_secs()
                    );
                    held.not_before = Some(Instant::now() + SWAP_RETRY);
                } else if held.failed_adoptions >= MAX_ADOPT_TRIES {
                    log::error!(
                        "service: giving up on {path}: removing it so its I/O fails instead of \
                         waiting forever (anything swapped to it is lost)"
                    );
                    if let Err(e) = delete_device_nowait(id) {
                        log::error!("service: removing {path}: {e}");
                    }
                    DeviceRecord::remove(&self.run_dir, id);
                    self.release(id, "given up");
                }
            }
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether two lists of fds reach the same files, in order.
fn same_files(a: &[OwnedFd], b: &[OwnedFd]) -> bool {
    let ids = |fds: &[OwnedFd]| -> Option<Vec<(u64, u64)>> {
        fds.iter().map(|f| handoff::file_id(f.as_fd())).collect()
    };
    matches!((ids(a), ids(b)), (Some(x), Some(y)) if x == y)
}

fn forget_in_fd_store(id: u32, count: usize) {
    if !under_systemd() {
        return;
    }
    for i in 0..count {
        let state = format!("FDSTOREREMOVE=1\nFDNAME={}", fd_name(id, i));
        if let Err(e) = notify_with_fds(&state, &[]) {
            log::warn!("service: {state:?}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::tests::some_fd as memfd;

    #[test]
    fn same_files_sees_through_duplicates() {
        let a = memfd();
        let dup = a.try_clone().unwrap();
        assert!(same_files(&[a], &[dup]));
        assert!(!same_files(&[memfd()], &[memfd()]));
        assert!(!same_files(&[memfd()], &[]));
    }

    #[test]
    fn fd_names_round_trip() {
        assert_eq!(fd_name(3, 12), "vramblk-3-12");
        assert_eq!(parse_fd_name("vramblk-3-12"), Some((3, 12)));
        assert_eq!(parse_fd_name("vramblk-3"), None);
        assert_eq!(parse_fd_name("other-3-1"), None);
        assert_eq!(parse_fd_name("vramblk-x-1"), None);
    }

    #[test]
    fn handed_back_fds_group_by_device_in_chunk_order() {
        let named = vec![
            ("vramblk-1-1".to_string(), memfd()),
            ("vramblk-0-0".to_string(), memfd()),
            ("vramblk-1-0".to_string(), memfd()),
            ("vramblk-2-1".to_string(), memfd()),
            ("stray".to_string(), memfd()),
        ];
        let by_id = group_by_device(named);
        assert_eq!(by_id.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(by_id[&1].len(), 2);
    }
}
