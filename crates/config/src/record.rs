use crate::{Backend, Compress, CopyMode, GpuPlace};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the daemon leaves one record per device, and its logs.
pub const RUN_DIR: &str = "/run/vramblk";

/// What the daemon serving a device writes down about it, so `list`, `del`
/// and a restarted daemon know what the kernel does not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: u32,
    pub size: u64,
    pub backend: Backend,
    /// Human description of the store, e.g. "host memfd (hugetlb)".
    pub store: String,
    pub gpu: Option<u32>,
    pub queues: u16,
    pub depth: u16,
    /// The server process (it maps the memory and runs the queues).
    pub pid: u32,
    pub log: PathBuf,
    /// The supervisor that holds the device's memory and restarts the
    /// server when it dies; absent in records of older versions.
    #[serde(default)]
    pub holder_pid: Option<u32>,
    /// Times the server was restarted (recovered) since the device was added.
    #[serde(default)]
    pub restarts: u32,
    /// Which device of /etc/vramblk.toml this is (`vramblk up`): its place
    /// among the config's devices, a `[[device]]` over several GPUs being
    /// one per GPU (`Config::per_gpu`); None for a device added by hand.
    #[serde(default)]
    pub origin: Option<usize>,
    /// When the device first went live (seconds since the epoch).
    #[serde(default)]
    pub live_since: Option<u64>,
    /// The length of each piece of memory behind the device, in order:
    /// one memfd for the host store, the exported VRAM chunks for cuda.
    #[serde(default)]
    pub backing: Vec<u64>,
    /// How a cuda device moves data; what a server that adopts the
    /// device's memory runs with.
    #[serde(default)]
    pub copy_mode: CopyMode,
    /// Whether the VRAM layout holds page checksums. A record without it
    /// was written by a vramblk that had none: false.
    #[serde(default)]
    pub integrity: bool,
    /// How the VRAM layout keeps pages (a record without it: off).
    #[serde(default)]
    pub compress: Compress,
    /// Where its GPU sits (cuda): the PCI device, its memory node and the
    /// CPUs the device's processes run on.
    #[serde(default)]
    pub place: Option<GpuPlace>,
}

/// Writes `value` as JSON to `path` atomically (a temporary file renamed
/// over it), so a reader sees the old file or the new one, never half.
pub fn store_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)?;
    std::fs::rename(tmp, path)
}

impl DeviceRecord {
    pub fn path(dir: &Path, id: u32) -> PathBuf {
        dir.join(format!("ublkb{id}.json"))
    }

    pub fn load(dir: &Path, id: u32) -> Option<DeviceRecord> {
        let text = std::fs::read_to_string(Self::path(dir, id)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes the record atomically (see [`store_json`]).
    pub fn store(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        store_json(&Self::path(dir, self.id), self)
    }

    pub fn remove(dir: &Path, id: u32) {
        let _ = std::fs::remove_file(Self::path(dir, id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_through_a_file() {
        let dir = std::env::temp_dir().join(format!("vramblk-record-{}", std::process::id()));
        let r = DeviceRecord {
            id: 3,
            size: 1 << 30,
            backend: Backend::Host,
            store: "host memfd".into(),
            gpu: None,
            queues: 2,
            depth: 128,
            pid: 42,
            log: "/run/vramblk/ublkb3.log".into(),
            holder_pid: Some(41),
            restarts: 2,
            origin: Some(1),
            live_since: Some(1_700_000_000),
            backing: vec![512 << 20, 512 << 20],
            copy_mode: CopyMode::Dma,
            integrity: true,
            compress: Compress::Lz,
            place: None,
        };
        r.store(&dir).unwrap();
        assert_eq!(DeviceRecord::load(&dir, 3), Some(r));
        DeviceRecord::remove(&dir, 3);
        assert_eq!(DeviceRecord::load(&dir, 3), None);
        let _ = std::fs::remove_dir(&dir);
    }

    #[test]
    fn records_without_the_recovery_fields_still_load() {
        let old = r#"{"id":1,"size":4096,"backend":"host","store":"host memfd","gpu":null,
                     "queues":1,"depth":1,"pid":7,"log":"/x.log"}"#;
        let r: DeviceRecord = serde_json::from_str(old).unwrap();
        assert_eq!((r.holder_pid, r.restarts), (None, 0));
    }
}
