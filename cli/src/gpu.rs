//! NVIDIA GPUs as NVML sees them: name and memory, without a CUDA context
//! (which would itself take VRAM). NVML is loaded at run time; where there
//! is no driver, opening it fails with one sentence. CUDA is told to
//! number GPUs in PCI bus order (see main), as NVML does, so an index here
//! is the `--gpu` index.

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use vramblk_config::Config;

pub struct Gpus(nvml_wrapper::Nvml);

impl Gpus {
    pub fn open() -> Result<Gpus> {
        nvml_wrapper::Nvml::init()
            .map(Gpus)
            .map_err(|e| anyhow!("NVML could not start ({e}): is the NVIDIA driver installed?"))
    }

    pub fn count(&self) -> Result<u32> {
        Ok(self.0.device_count()?)
    }

    /// The VRAM each process with a CUDA context on GPU `index` uses, as
    /// NVML counts it (pid, bytes; None where NVML cannot say).
    pub fn process_vram(&self, index: u32) -> Result<Vec<(u32, Option<u64>)>> {
        let d = self.0.device_by_index(index)?;
        Ok(d.running_compute_processes()?
            .into_iter()
            .map(|p| {
                let used = match p.used_gpu_memory {
                    nvml_wrapper::enums::device::UsedGpuMemory::Used(b) => Some(b),
                    nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => None,
                };
                (p.pid, used)
            })
            .collect())
    }

    pub fn info(&self, index: u32) -> Result<GpuEntry> {
        let d = self.0.device_by_index(index)?;
        let m = d.memory_info()?;
        let pci = d.pci_info()?;
        Ok(GpuEntry {
            index,
            name: d.name()?,
            free: m.free,
            total: m.total,
            pci_bus_id: vramblk_cuda_store::probe::pci_address(
                pci.domain as i32,
                pci.bus as i32,
                pci.device as i32,
            ),
        })
    }
}

/// One GPU: its name and memory (bytes), as `vramblk gpus --json` prints
/// it and as the devices over several GPUs are planned from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuEntry {
    pub index: u32,
    pub name: String,
    pub free: u64,
    pub total: u64,
    /// "0000:41:00.0", as sysfs names it.
    pub pci_bus_id: String,
}

/// Where the GPU list came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Nvml,
    Cuda,
}

/// Every GPU, from NVML in this process (no VRAM taken). Where NVML is
/// missing, from CUDA in a process of its own (`vramblk gpus --json`): a
/// process that forks servers, as `add` and the service do, must not start
/// CUDA itself (a forked child cannot use CUDA its parent started).
pub fn inventory() -> Result<Vec<GpuEntry>> {
    match Gpus::open() {
        Ok(g) => from_nvml(&g),
        Err(nvml) => {
            let exe = std::env::current_exe().context("finding the vramblk binary")?;
            let out = std::process::Command::new(exe)
                .args(["gpus", "--json"])
                .stdin(std::process::Stdio::null())
                .output()
                .context("running `vramblk gpus --json`")?;
            if !out.status.success() {
                bail!(
                    "{nvml}; and CUDA could not list them either: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            serde_json::from_slice(&out.stdout).context("reading `vramblk gpus --json`")
        }
    }
}

/// The GPUs NVML sees.
pub fn from_nvml(g: &Gpus) -> Result<Vec<GpuEntry>> {
    (0..g.count()?).map(|index| g.info(index)).collect()
}

/// The GPUs CUDA sees, each read through its primary context (created
/// and let go here: only in a process that forks nothing after).
pub fn from_cuda() -> Result<Vec<GpuEntry>> {
    use vramblk_cuda_store::probe;
    let count = probe::gpu_count()?;
    (0..count)
        .map(|index| {
            let p = probe::probe(index).with_context(|| format!("GPU {index}"))?;
            Ok(GpuEntry {
                index,
                name: p.name,
                free: p.free,
                total: p.total,
                pci_bus_id: p.pci_bus_id,
            })
        })
        .collect()
}

/// The list, from NVML or else CUDA in this process (`vramblk gpus`).
pub fn list_here() -> Result<(Vec<GpuEntry>, Source)> {
    match Gpus::open() {
        Ok(g) => Ok((from_nvml(&g)?, Source::Nvml)),
        Err(nvml) => match from_cuda() {
            Ok(l) => Ok((l, Source::Cuda)),
            Err(cuda) => bail!("{nvml}; and through CUDA: {cuda:#}"),
        },
    }
}

/// The config with an entry over several GPUs made one device per GPU,
/// its size split by each GPU's free VRAM (`Config::per_gpu`); a config
/// whose entries each name one GPU comes back as it is, no GPU asked.
pub fn one_device_per_gpu(config: Config) -> Result<Config> {
    if config.devices.iter().all(|d| d.gpu.single().is_some()) {
        return Ok(config);
    }
    let gpus = inventory().context("listing the GPUs for the devices over several")?;
    let devices = config
        .per_gpu(gpus.len() as u32, &|g| {
            gpus.iter().find(|e| e.index == g).map(|e| e.free)
        })
        .map_err(anyhow::Error::msg)?;
    Ok(Config { devices, ..config })
}
