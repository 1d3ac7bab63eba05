//! NVIDIA GPUs as NVML sees them: name and memory, without a CUDA context
//! (which would itself take VRAM). NVML is loaded at run time; where there
//! is no driver, opening it fails with one sentence. CUDA is told to
//! number GPUs in PCI bus order (see main), as NVML does, so an index here
//! is the `--gpu` index.

use anyhow::{anyhow, Result};

/// One GPU's name and memory (bytes).
pub struct GpuInfo {
    pub name: String,
    pub free: u64,
    pub total: u64,
}

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

    pub fn info(&self, index: u32) -> Result<GpuInfo> {
        let d = self.0.device_by_index(index)?;
        let m = d.memory_info()?;
        Ok(GpuInfo {
            name: d.name()?,
            free: m.free,
            total: m.total,
        })
    }
}
