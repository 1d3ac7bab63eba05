//! What the machine's GPUs are, through CUDA: for `vramblk gpus` where NVML
//! is missing (and so for the stand-in libcuda in the VM). Reading a GPU's
//! free VRAM needs its primary context, which itself takes VRAM while it
//! lives; the probe lets it go at once. A process that forks servers must
//! not call this (a forked child cannot use CUDA its parent started):
//! `vramblk` runs it in a process of its own.

use crate::driver::{checked, init};
use crate::store::CudaStore;
use cudarc::driver::{result, sys};
use vramblk_store::StoreError;

/// One GPU as CUDA sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuProbe {
    pub index: u32,
    pub name: String,
    pub free: u64,
    pub total: u64,
    /// "dddd:bb:dd.f", as sysfs names the PCI device.
    pub pci_bus_id: String,
}

/// How many CUDA GPUs the machine has (no context made).
pub fn gpu_count() -> Result<u32, StoreError> {
    init()?;
    let n = checked(result::device::get_count(), "cuDeviceGetCount")?;
    Ok(n.max(0) as u32)
}

/// GPU `index`: name, free and total VRAM, PCI address.
pub fn probe(index: u32) -> Result<GpuProbe, StoreError> {
    let store = CudaStore::context_only_plain(index)?;
    let (free, total) = checked(result::mem_get_info(), "cuMemGetInfo")?;
    let attr = |a: sys::CUdevice_attribute, what: &str| {
        // SAFETY: the device the store opened.
        checked(
            unsafe { result::device::get_attribute(store.device_handle(), a) },
            what,
        )
    };
    use sys::CUdevice_attribute as A;
    let domain = attr(A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID, "PCI domain")?;
    let bus = attr(A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID, "PCI bus")?;
    let dev = attr(A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID, "PCI device")?;
    Ok(GpuProbe {
        index,
        name: store.gpu_name().to_string(),
        free: free as u64,
        total: total as u64,
        pci_bus_id: pci_address(domain, bus, dev),
    })
}

/// The sysfs name of a PCI function 0.
pub fn pci_address(domain: i32, bus: i32, device: i32) -> String {
    format!("{domain:04x}:{bus:02x}:{device:02x}.0")
}

#[cfg(test)]
mod tests {
    #[test]
    fn pci_addresses_read_as_sysfs_names_them() {
        assert_eq!(super::pci_address(0, 0x41, 0), "0000:41:00.0");
        assert_eq!(super::pci_address(1, 0xc1, 0x1f), "0001:c1:1f.0");
    }
}
