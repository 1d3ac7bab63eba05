//! What a device will be, decided before anything touches the kernel: the
//! plan `add` makes from its arguments and `up` from the config file, and
//! what supervisors, servers and adoption act on.

use crate::host::cpu_count;
use anyhow::{anyhow, Result};
use std::path::PathBuf;
use vramblk_config::{defaults, Backend, Compress, CopyMode, DeviceConfig, DeviceRecord, GpuPlace};
use vramblk_ublk_target::{DeviceOptions, IoCommands};

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
    /// How a cuda device keeps its pages (compressed or whole).
    pub compress: Compress,
    pub device: DeviceOptions,
    /// Where the supervisor and its servers log ("-": the terminal).
    pub log: PathBuf,
    /// Which device of the config file it is (`up`; `Config::per_gpu`
    /// numbers them), or None for a device added by hand.
    pub origin: Option<usize>,
    /// Where its GPU sits; its processes run on the CPUs named there.
    pub place: Option<GpuPlace>,
}

impl Plan {
    /// The plan a new supervisor serves an existing device with (one that
    /// adopts it, one re-executed for an upgrade): its shape from the record
    /// the last server wrote.
    pub fn from_record(record: &DeviceRecord) -> Plan {
        Plan {
            size: record.size,
            backend: record.backend,
            hugetlb: false,
            gpu: record.gpu.unwrap_or(0),
            reserve: 0,
            copy_mode: record.copy_mode,
            integrity: Some(record.integrity),
            compress: record.compress,
            device: DeviceOptions {
                id: record.id as i32,
                queues: record.queues,
                depth: record.depth,
                max_io_bytes: defaults::MAX_IO_BYTES,
                // The device keeps the commands it was added with.
                io_commands: IoCommands::Auto,
            },
            log: record.log.clone(),
            origin: record.origin,
            place: record.place.clone(),
        }
    }

    /// The plan for device `index` of the config file's devices, one per
    /// GPU (`Config::per_gpu`: an entry over several GPUs is several).
    pub fn from_config(d: &DeviceConfig, index: usize) -> Result<Plan> {
        let gpu = d.gpu.single().ok_or_else(|| {
            anyhow!(
                "device {}: gpu = \"{}\" names several GPUs: one device each",
                d.entry,
                d.gpu
            )
        })?;
        let device = DeviceOptions {
            id: -1,
            queues: d.queues.unwrap_or_else(cpu_count),
            depth: d.depth,
            max_io_bytes: defaults::MAX_IO_BYTES,
            io_commands: match d.io_commands {
                vramblk_config::IoCommands::Auto => IoCommands::Auto,
                vramblk_config::IoCommands::PerTag => IoCommands::PerTag,
            },
        };
        device.validate()?;
        Ok(Plan {
            size: d.size,
            backend: d.backend,
            hugetlb: d.hugepages,
            gpu,
            reserve: d.reserve,
            copy_mode: d.copy_mode,
            integrity: d.integrity,
            compress: d.compress,
            device,
            log: PathBuf::from("-"),
            origin: Some(index),
            place: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adoption_plan_keeps_the_device_shape() {
        let record = DeviceRecord {
            id: 4,
            size: 1 << 30,
            backend: Backend::Cuda,
            store: "cuda".into(),
            gpu: Some(1),
            queues: 3,
            depth: 64,
            pid: 10,
            log: "/run/vramblk/x.log".into(),
            holder_pid: Some(9),
            restarts: 0,
            origin: Some(2),
            live_since: None,
            backing: vec![1 << 29, 1 << 29],
            copy_mode: vramblk_config::CopyMode::Dma,
            integrity: true,
            compress: Compress::Lz,
            place: Some(GpuPlace {
                pci_bus_id: "0000:41:00.0".into(),
                numa_node: Some(1),
                cpus: Some("16-31".into()),
            }),
        };
        let plan = Plan::from_record(&record);
        assert_eq!(plan.device.id, 4);
        assert_eq!((plan.device.queues, plan.device.depth), (3, 64));
        assert_eq!((plan.gpu, plan.origin), (1, Some(2)));
        assert_eq!(plan.copy_mode, vramblk_config::CopyMode::Dma);
        assert_eq!(plan.integrity, Some(true), "the layout the record names");
        assert_eq!(plan.compress, Compress::Lz, "a compressed layout stays one");
        assert_eq!(plan.place, record.place, "pinned where it was");
    }
}
