//! Allocating, exporting, erasing and releasing the device's VRAM.

use crate::driver::{check, describe, init};
use crate::kernel::CopyKernel;
use crate::queue::{CopyPath, CudaQueue};
use crate::{CopyPolicy, BACKOFF_STEP};
use cudarc::driver::sys;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use vramblk_store::{BufferRegion, Store, StoreError};

#[derive(Clone, Debug)]
pub struct CudaStoreOptions {
    /// The ceiling: the store takes what VRAM allows, in 512 MiB steps.
    pub size: u64,
    pub gpu: u32,
    /// VRAM left free for the display and other GPU work.
    pub reserve: u64,
    /// Which requests the copy kernel moves.
    pub copy: CopyPolicy,
}

impl CudaStoreOptions {
    /// The defaults for `size` bytes on GPU `gpu`.
    pub fn new(size: u64, gpu: u32) -> CudaStoreOptions {
        CudaStoreOptions {
            size,
            gpu,
            reserve: 512 << 20,
            copy: CopyPolicy::AUTO,
        }
    }
}

/// One exported `cuMemCreate` chunk.
struct Chunk {
    handle: sys::CUmemGenericAllocationHandle,
    len: usize,
    fd: OwnedFd,
}

pub struct CudaStore {
    pub(crate) ctx: sys::CUcontext,
    device: sys::CUdevice,
    pub(crate) base: sys::CUdeviceptr,
    size: u64,
    chunks: Vec<Chunk>,
    name: String,
    /// Zero the VRAM when dropped. Off while a supervisor holds the
    /// memory for the next server: a server that fails must not wipe it.
    erase_on_drop: AtomicBool,
    kernel: Option<CopyKernel>,
    copy: CopyPolicy,
}

// SAFETY: a CUcontext may be made current on any thread; every queue does
// so before using it, and the store itself is only read after creation.
unsafe impl Send for CudaStore {}
unsafe impl Sync for CudaStore {}

impl CudaStore {
    /// Allocates up to `opts.size` bytes on GPU `opts.gpu`, leaving
    /// `opts.reserve` free; fails with one sentence when there is no driver,
    /// no such GPU, or not even one step of VRAM.
    pub fn create(opts: &CudaStoreOptions) -> Result<CudaStore, StoreError> {
        let mut store = Self::open_device(opts.gpu)?;
        store.allocate(opts)?;
        store.load_kernel(opts.copy);
        Ok(store)
    }

    /// Rebuilds a store in this process from VRAM another process
    /// allocated and exported (its chunks' lengths and fds, in order), as
    /// a recovering server does with what its supervisor held. The data is
    /// what the dead server left.
    pub fn import(
        gpu: u32,
        size: u64,
        chunks: &[(usize, BorrowedFd)],
        copy: CopyPolicy,
    ) -> Result<CudaStore, StoreError> {
        let mut store = Self::open_device(gpu)?;
        let total: u64 = chunks.iter().map(|(len, _)| *len as u64).sum();
        if chunks.is_empty() || total < size {
            return Err(StoreError::Invalid(format!(
                "imported VRAM holds {total} bytes in {} chunks, less than the device's {size}",
                chunks.len()
            )));
        }
        for (len, fd) in chunks {
            let own = fd.try_clone_to_owned().map_err(|e| StoreError::Os {
                what: "duplicating a VRAM fd".into(),
                source: e,
            })?;
            let mut handle = 0;
            // SAFETY: valid out-pointer; for POSIX-fd handles the driver
            // takes the fd number itself in place of the pointer.
            check(
                unsafe {
                    sys::cuMemImportFromShareableHandle(
                        &mut handle,
                        own.as_raw_fd() as usize as *mut std::ffi::c_void,
                        sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                    )
                },
                "importing VRAM from a file descriptor",
            )?;
            store.chunks.push(Chunk {
                handle,
                len: *len,
                fd: own,
            });
        }
        store.map(size)?;
        store.load_kernel(copy);
        log::info!(
            "cuda store: {} MiB on {} imported from {} chunks",
            size >> 20,
            store.name,
            store.chunks.len()
        );
        Ok(store)
    }

    /// Each chunk's length with its fd, in mapping order: what [`import`]
    /// needs in another process.
    ///
    /// [`import`]: CudaStore::import
    pub fn exported_chunks(&self) -> Vec<(usize, BorrowedFd<'_>)> {
        self.chunks.iter().map(|c| (c.len, c.fd.as_fd())).collect()
    }

    /// Loads the copy kernel unless the copy engines alone were asked for;
    /// a kernel that does not load leaves the store on the copy engines.
    fn load_kernel(&mut self, copy: CopyPolicy) {
        self.copy = CopyPolicy::DMA;
        if !copy.uses_kernel() {
            log::info!("cuda store: copy engines only (dma mode)");
            return;
        }
        match CopyKernel::load() {
            Ok(k) => {
                self.kernel = Some(k);
                self.copy = copy;
            }
            Err(e) => log::warn!("{e}: serving with the copy engines only"),
        }
    }

    /// The copy policy in force (DMA when the kernel did not load).
    pub fn copy_policy(&self) -> CopyPolicy {
        self.copy
    }

    /// Whether dropping the store zeroes the VRAM first (on by default).
    pub fn set_erase_on_drop(&self, on: bool) {
        self.erase_on_drop.store(on, Ordering::SeqCst);
    }

    /// Initialises the driver and opens GPU `gpu`'s primary context, with
    /// no memory yet.
    fn open_device(gpu: u32) -> Result<CudaStore, StoreError> {
        init()?;
        // SAFETY: driver calls with valid out-pointers; every result is checked.
        unsafe {
            let mut count = 0;
            check(sys::cuDeviceGetCount(&mut count), "cuDeviceGetCount")?;
            if gpu as i64 >= count as i64 {
                return Err(StoreError::Invalid(format!(
                    "--gpu {gpu}: this machine has {count} CUDA device(s)"
                )));
            }
            let mut device = 0;
            check(sys::cuDeviceGet(&mut device, gpu as i32), "cuDeviceGet")?;
            let mut name_buf = [0 as std::ffi::c_char; 128];
            check(
                sys::cuDeviceGetName(name_buf.as_mut_ptr(), 128, device),
                "cuDeviceGetName",
            )?;
            let name = std::ffi::CStr::from_ptr(name_buf.as_ptr())
                .to_string_lossy()
                .into_owned();
            let mut ctx = std::ptr::null_mut();
            check(
                sys::cuDevicePrimaryCtxRetain(&mut ctx, device),
                "cuDevicePrimaryCtxRetain",
            )?;
            check(sys::cuCtxSetCurrent(ctx), "cuCtxSetCurrent")?;
            Ok(CudaStore {
                ctx,
                device,
                base: 0,
                size: 0,
                chunks: Vec::new(),
                name,
                erase_on_drop: AtomicBool::new(true),
                kernel: None,
                copy: CopyPolicy::DMA,
            })
        }
    }

    fn prop(&self) -> sys::CUmemAllocationProp {
        // SAFETY: CUmemAllocationProp is a plain C struct; zero is its default.
        let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
        prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = self.device;
        prop.requestedHandleTypes =
            sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
        prop
    }

    fn allocate(&mut self, opts: &CudaStoreOptions) -> Result<(), StoreError> {
        let prop = self.prop();
        let (mut free, mut total, mut gran) = (0usize, 0usize, 0usize);
        // SAFETY: valid out-pointers.
        unsafe {
            check(sys::cuMemGetInfo_v2(&mut free, &mut total), "cuMemGetInfo")?;
            check(
                sys::cuMemGetAllocationGranularity(
                    &mut gran,
                    &prop,
                    sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
                ),
                "cuMemGetAllocationGranularity",
            )?;
        }
        let gran = gran.max(1) as u64;
        let target = granted_target(opts.size, free as u64, opts.reserve);
        if target == 0 {
            return Err(StoreError::TooLarge(format!(
                "VRAM short on {}: {} MiB free, {} MiB kept in reserve, not even {} MiB left for the device",
                self.name,
                free >> 20,
                opts.reserve >> 20,
                BACKOFF_STEP >> 20
            )));
        }
        // Whole steps, the last rounded up to the granularity: a failure
        // stops on a step boundary, so what was got is itself a back-off.
        let mut got = 0u64;
        while got < target {
            let len = (target - got).min(BACKOFF_STEP).div_ceil(gran) * gran;
            match self.create_chunk(len as usize, &prop) {
                Ok(c) => {
                    got += c.len as u64;
                    self.chunks.push(c);
                }
                Err(e) if got > 0 => {
                    log::warn!("VRAM allocation stopped at {} MiB: {e}", got >> 20);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        let size = got.min(target);
        self.map(size)?;
        log::info!(
            "cuda store: {} MiB on {} in {} chunks ({} MiB free before, {} MiB reserve)",
            self.size >> 20,
            self.name,
            self.chunks.len(),
            free >> 20,
            opts.reserve >> 20
        );
        Ok(())
    }

    fn create_chunk(
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
                    describe(r)
                )));
            }
            Ok(Chunk {
                handle,
                len,
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }

    /// Reserves one address range, maps every chunk into it and exposes
    /// the first `size` bytes.
    fn map(&mut self, size: u64) -> Result<(), StoreError> {
        let va_len = self.mapped_len();
        // SAFETY: valid out-pointers; ranges come from the reservation.
        unsafe {
            check(
                sys::cuMemAddressReserve(&mut self.base, va_len, 0, 0, 0),
                "cuMemAddressReserve",
            )?;
            let mut off = 0usize;
            for c in &self.chunks {
                check(
                    sys::cuMemMap(self.base + off as u64, c.len, 0, c.handle, 0),
                    "cuMemMap",
                )?;
                off += c.len;
            }
            let mut access: sys::CUmemAccessDesc = std::mem::zeroed();
            access.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
            access.location.id = self.device;
            access.flags = sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
            check(
                sys::cuMemSetAccess(self.base, va_len, &access, 1),
                "cuMemSetAccess",
            )?;
        }
        self.size = size;
        Ok(())
    }

    /// Makes this store's context current on the calling thread (for
    /// tools that call the driver beside the store).
    pub fn make_current(&self) -> Result<(), StoreError> {
        // SAFETY: the context is retained for the store's lifetime.
        check(unsafe { sys::cuCtxSetCurrent(self.ctx) }, "cuCtxSetCurrent")
    }

    pub fn gpu_name(&self) -> &str {
        &self.name
    }

    /// Bytes of VRAM the chunks hold (the reserved range's length).
    fn mapped_len(&self) -> usize {
        self.chunks.iter().map(|c| c.len).sum()
    }

    /// Zeroes the whole device (swap pages can hold secrets).
    pub fn erase(&self) -> Result<(), StoreError> {
        if self.base == 0 {
            // Never mapped (creation failed): nothing readable to erase.
            return Ok(());
        }
        // SAFETY: the range is ours and mapped.
        unsafe {
            check(sys::cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")?;
            check(
                sys::cuMemsetD8_v2(self.base, 0, self.mapped_len()),
                "erasing VRAM",
            )?;
            check(sys::cuCtxSynchronize(), "erasing VRAM")
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

impl Drop for CudaStore {
    fn drop(&mut self) {
        if self.erase_on_drop.load(Ordering::SeqCst) {
            if let Err(e) = self.erase() {
                log::error!("could not erase VRAM before release: {e}");
            }
        }
        let len = self.mapped_len();
        // The module goes while its context is still retained.
        drop(self.kernel.take());
        // SAFETY: unmapping and releasing what this store mapped; no queue is
        // left (they hold an Arc to the store).
        unsafe {
            if self.base != 0 {
                sys::cuMemUnmap(self.base, len);
                sys::cuMemAddressFree(self.base, len);
            }
            for c in &self.chunks {
                sys::cuMemRelease(c.handle);
            }
            sys::cuDevicePrimaryCtxRelease_v2(self.device);
        }
        log::info!("cuda store: {} MiB unmapped and released", len >> 20);
    }
}

impl Store for CudaStore {
    type Queue = CudaQueue;

    fn size(&self) -> u64 {
        self.size
    }

    fn describe(&self) -> String {
        format!("cuda {}", self.name)
    }

    fn open_queue(&self, _qid: u16, buffers: &BufferRegion) -> Result<CudaQueue, StoreError> {
        let path = CopyPath {
            kernel: self.kernel.as_ref().map(|k| k.function),
            policy: self.copy,
        };
        CudaQueue::open(self.ctx, self.base, buffers, path)
    }

    fn backing_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.chunks.iter().map(|c| c.fd.as_fd()).collect()
    }

    fn backing_layout(&self) -> Vec<u64> {
        self.chunks.iter().map(|c| c.len as u64).collect()
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

#[cfg(test)]
mod no_gpu_tests {
    use super::{CudaStore, CudaStoreOptions};

    /// Where libcuda is missing (CI, the VM host) `create` must fail with
    /// one sentence, never panic. On a machine with a driver this says so
    /// and checks nothing: the GPU checks are engine-bench's
    /// (`cargo xtask bench-engine`).
    #[test]
    fn without_a_driver_create_says_why_in_one_sentence() {
        // SAFETY: only probes whether the shared library can be opened.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            eprintln!("SKIPPED: libcuda is present here; engine-bench covers the GPU path");
            return;
        }
        let e = match CudaStore::create(&CudaStoreOptions::new(1 << 30, 0)) {
            Ok(_) => panic!("a store without a driver"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("no CUDA driver"), "{e}");
        assert!(e.contains("--backend host"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }
}
