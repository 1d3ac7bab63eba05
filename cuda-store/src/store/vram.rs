//! The VRAM itself: `cuMemCreate` chunks with the POSIX-fd handle type,
//! exported as fds, mapped in order into one reserved range; how much to
//! allocate when VRAM is short.

use super::{chunk_len, Chunk, CudaStore, CudaStoreOptions, CHUNK_SLOTS};
use crate::driver::{check, checked, describe};
use crate::extents::EXTENT;
use crate::BACKOFF_STEP;
use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;
use std::os::fd::{FromRawFd, OwnedFd};
use vramblk_store::StoreError;

impl CudaStore {
    pub(super) fn prop(&self) -> sys::CUmemAllocationProp {
        // SAFETY: CUmemAllocationProp is a plain C struct; zero is its default.
        let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
        prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = self.device;
        prop.requestedHandleTypes =
            sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
        prop
    }

    /// Free VRAM on the GPU now, bytes.
    pub(super) fn free_vram(&self) -> Result<u64, StoreError> {
        let (free, _total) = checked(result::mem_get_info(), "cuMemGetInfo")?;
        Ok(free as u64)
    }

    pub(super) fn allocate(&mut self, opts: &CudaStoreOptions) -> Result<(), StoreError> {
        let prop = self.prop();
        let mut gran = 0usize;
        // SAFETY: valid out-pointers.
        check(
            unsafe {
                sys::cuMemGetAllocationGranularity(
                    &mut gran,
                    &prop,
                    sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
                )
            },
            "cuMemGetAllocationGranularity",
        )?;
        if gran as u64 > EXTENT || !EXTENT.is_multiple_of(gran.max(1) as u64) {
            return Err(StoreError::Unavailable(format!(
                "{}: VRAM allocation granularity {gran} bytes does not divide the 2 MiB extent",
                self.name
            )));
        }
        let free = self.free_vram()?;
        let layout = self.layout();
        if layout.compress.is_on() {
            return self.allocate_compressed(opts, free);
        }
        // The map's slot (and the checksums') come on top of the device.
        let overhead = u64::from(layout.reserved(opts.size)) * EXTENT;
        let target = granted_target(opts.size, free.saturating_sub(overhead), opts.reserve);
        if target == 0 {
            return Err(self.short(free, opts.reserve, BACKOFF_STEP));
        }
        // A failure stops on a chunk boundary: the device shrinks to what
        // the chunks got hold, less the map's slot and the checksums'.
        let mut size = target;
        let mut chunks = Vec::new();
        let mut i = 0;
        while i < layout.slots(size).div_ceil(CHUNK_SLOTS) {
            match self.create_chunk(chunk_len(i, layout.slots(size)), &prop) {
                Ok(c) => chunks.push(c),
                Err(e) if i > 0 => {
                    size = layout.size_in(i * CHUNK_SLOTS);
                    log::warn!("VRAM allocation stopped at {} MiB: {e}", size >> 20);
                    break;
                }
                Err(e) => return Err(e),
            }
            i += 1;
        }
        self.size = size;
        self.slots = layout.slots(size);
        *self.chunks.get_mut().unwrap_or_else(|p| p.into_inner()) = chunks;
        self.map_range()?;
        log::info!(
            "cuda store: {} MiB on {} in {} chunks ({} MiB free before, {} MiB reserve)",
            self.size >> 20,
            self.name,
            self.lock_chunks().len(),
            free >> 20,
            opts.reserve >> 20
        );
        Ok(())
    }

    /// A compressed device keeps its size whatever VRAM there is: it holds
    /// the chunks VRAM allows (at least those of its maps and one extent of
    /// data), up to what it would need with every page whole.
    fn allocate_compressed(
        &mut self,
        opts: &CudaStoreOptions,
        free: u64,
    ) -> Result<(), StoreError> {
        let prop = self.prop();
        let layout = self.layout();
        let slots = layout.slots(opts.size);
        let full = u64::from(slots) * EXTENT;
        // Whole chunks that hold the maps and at least one extent of data.
        let least = (u64::from(layout.reserved(opts.size)) * EXTENT + EXTENT)
            .next_multiple_of(BACKOFF_STEP)
            .min(full);
        // The queues' staging comes out of what is left free.
        let reserve = opts.reserve + crate::packed::STAGING_ROOM;
        let target = granted_target(full, free, reserve);
        if target < least {
            return Err(self.short(free, reserve, least));
        }
        let wanted = (target.div_ceil(EXTENT) as u32).div_ceil(CHUNK_SLOTS);
        let mut chunks = Vec::new();
        for i in 0..wanted {
            match self.create_chunk(chunk_len(i, slots), &prop) {
                Ok(c) => chunks.push(c),
                Err(e) if u64::from(i) * BACKOFF_STEP >= least => {
                    log::warn!(
                        "VRAM allocation stopped at {} MiB: {e}",
                        (u64::from(i) * BACKOFF_STEP) >> 20
                    );
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        self.size = opts.size;
        self.slots = slots;
        *self.chunks.get_mut().unwrap_or_else(|p| p.into_inner()) = chunks;
        self.map_range()?;
        log::info!(
            "cuda store: {} MiB compressed device on {} holding {} MiB of VRAM in {} chunks \
             ({} MiB with every page whole; {} MiB free before, {} MiB reserve)",
            self.size >> 20,
            self.name,
            self.held_bytes() >> 20,
            self.lock_chunks().len(),
            full >> 20,
            free >> 20,
            reserve >> 20
        );
        Ok(())
    }

    /// The error when VRAM cannot hold even `least` bytes of the device.
    fn short(&self, free: u64, reserve: u64, least: u64) -> StoreError {
        StoreError::TooLarge(format!(
            "VRAM short on {}: {} MiB free, {} MiB kept in reserve, not even {} MiB left for the device",
            self.name,
            free >> 20,
            reserve >> 20,
            least >> 20
        ))
    }

    pub(super) fn create_chunk(
        &self,
        len: usize,
        prop: &sys::CUmemAllocationProp,
    ) -> Result<Chunk, StoreError> {
        let mut handle = 0;
        // SAFETY: valid out-pointers; the handle is released on every error path.
        unsafe {
            check(sys::cuMemCreate(&mut handle, len, prop, 0), "cuMemCreate")?;
            let mut fd: std::ffi::c_int = -1;
            let r = sys::cuMemExportToShareableHandle(
                (&mut fd as *mut std::ffi::c_int).cast(),
                handle,
                sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                0,
            );
            if r != sys::CUresult::CUDA_SUCCESS || fd < 0 {
                sys::cuMemRelease(handle);
                return Err(StoreError::Unavailable(format!(
                    "exporting VRAM as a file descriptor: {}",
                    describe(DriverError(r))
                )));
            }
            Ok(Chunk {
                handle,
                len,
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }

    /// Reserves the whole layout's address range and maps the chunks held
    /// at its start.
    pub(super) fn map_range(&mut self) -> Result<(), StoreError> {
        let va_len = self.full_bytes() as usize;
        // SAFETY: valid out-pointer.
        check(
            unsafe { sys::cuMemAddressReserve(&mut self.base, va_len, 0, 0, 0) },
            "cuMemAddressReserve",
        )?;
        let chunks = std::mem::take(self.chunks.get_mut().unwrap_or_else(|p| p.into_inner()));
        let mut mapped = Vec::new();
        let mut result = Ok(());
        for c in chunks {
            if result.is_ok() {
                result = self.map_chunk(mapped.len() as u32, &c);
            }
            mapped.push(c);
        }
        *self.chunks.get_mut().unwrap_or_else(|p| p.into_inner()) = mapped;
        result
    }

    /// Maps chunk `i` at its place in the range, readable and writable.
    pub(super) fn map_chunk(&self, i: u32, c: &Chunk) -> Result<(), StoreError> {
        let at = self.base + u64::from(i) * BACKOFF_STEP;
        // SAFETY: the range lies inside our reservation and holds no other
        // mapping; the handle is ours.
        unsafe {
            check(sys::cuMemMap(at, c.len, 0, c.handle, 0), "cuMemMap")?;
            let mut access: sys::CUmemAccessDesc = std::mem::zeroed();
            access.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
            access.location.id = self.device;
            access.flags = sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
            check(sys::cuMemSetAccess(at, c.len, &access, 1), "cuMemSetAccess")
        }
    }
}

/// Bytes to allocate: all of `asked` when free VRAM beyond `reserve` holds
/// it, otherwise what does fit, backed off to whole 512 MiB steps (as
/// nbd-vram does); 0 when not even one step fits.
pub(crate) fn granted_target(asked: u64, free: u64, reserve: u64) -> u64 {
    let usable = free.saturating_sub(reserve);
    if asked <= usable {
        asked
    } else {
        usable - usable % BACKOFF_STEP
    }
}

#[cfg(test)]
mod tests {
    use super::granted_target;

    const MIB: u64 = 1 << 20;

    #[test]
    fn grants_what_fits_in_whole_steps() {
        // Plenty of VRAM: exactly what was asked, odd sizes too.
        assert_eq!(granted_target(7 << 30, 80 << 30, 512 * MIB), 7 << 30);
        assert_eq!(
            granted_target((1 << 30) + 4096, 80 << 30, 512 * MIB),
            (1 << 30) + 4096
        );
        // Short: back off to 512 MiB steps below free - reserve.
        assert_eq!(granted_target(7 << 30, 6 << 30, 512 * MIB), 5632 * MIB);
        assert_eq!(granted_target(7 << 30, 6000 * MIB, 512 * MIB), 5120 * MIB);
        // Not one step left.
        assert_eq!(granted_target(7 << 30, 1000 * MIB, 512 * MIB), 0);
        assert_eq!(granted_target(7 << 30, 100 * MIB, 512 * MIB), 0);
    }
}
