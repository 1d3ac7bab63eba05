//! What a device will be, decided before anything touches the kernel: the
//! plan `add` makes from its arguments and `up` from the config file, and
//! what supervisors, servers and adoption act on.

use crate::host::cpu_count;
use anyhow::Result;
use std::path::PathBuf;
use vramblk_config::{defaults, Backend, CopyMode, DeviceConfig};
use vramblk_ublk_target::DeviceOptions;

/// Everything `add` decided before touching the kernel.
pub struct Plan {
    pub size: u64,
    pub backend: Backend,
    pub hugetlb: bool,
    pub gpu: u32,
    pub reserve: u64,
    pub copy_mode: CopyMode,
    /// Per-page checksums in VRAM (cuda); None: where the GPU has no ECC.
    pub integrity: Option<bool>,
    pub device: DeviceOptions,
    /// Where the supervisor and its servers log ("-": the terminal).
    pub log: PathBuf,
    /// The `[[device]]` entry of the config file it comes from (`up`), or
    /// None for a device added by hand.
    pub origin: Option<usize>,
}

impl Plan {
    /// The plan for entry `index` of the config file.
    pub fn from_config(d: &DeviceConfig, index: usize) -> Result<Plan> {
        let device = DeviceOptions {
            id: -1,
            queues: d.queues.unwrap_or_else(cpu_count),
            depth: d.depth,
            max_io_bytes: defaults::MAX_IO_BYTES,
        };
        device.validate()?;
        Ok(Plan {
            size: d.size,
            backend: d.backend,
            hugetlb: d.hugepages,
            gpu: d.gpu,
            reserve: d.reserve,
            copy_mode: d.copy_mode,
            integrity: d.integrity,
            device,
            log: PathBuf::from("-"),
            origin: Some(index),
        })
    }
}
