//! The VRAM store: opening the GPU, creating a device or importing one
//! another process left, erasing it, the `Store` impl. By job beside it:
//! vram.rs (the chunks), map_io.rs (the extent map in slot 0),
//! give_back.rs (giving VRAM back and taking it back), inspect.rs (test
//! hooks).
//!
//! Layout: one reserved address range of `slots` 2 MiB slots, backed by
//! `cuMemCreate` chunks of [`BACKOFF_STEP`] (the last one shorter) mapped
//! in order from its start; the chunks held are always a prefix, so giving
//! VRAM back frees the last ones. Slot 0 holds the extent map (a header,
//! then one u32 per extent: slot + 1, 0 unmapped), each entry written and
//! waited for before the mapping is used, so a recovering server reads
//! back where every extent lives. With integrity on, the slots after it
//! hold every page's checksum ([`crate::integrity`]). Free slots are always
//! zero.

pub(crate) mod give_back;
mod inspect;
mod map_io;
mod vram;

use crate::driver::{check, checked, init};
use crate::extents::{entry_addr, slot_addr, ExtentMap, EXTENT, MAP_HEADER, MAP_SLOT};
use crate::integrity::sum_slots;
use crate::kernel::CopyKernel;
use crate::packed::{self, Compress, Packed, PackedQueue, PackedUsage};
use crate::page_kernels::PageKernels;
use crate::queue::{CopyPath, CudaQueue};
use crate::{CopyPolicy, BACKOFF_STEP};
use cudarc::driver::result;
use cudarc::driver::sys;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use vramblk_store::{BufferRegion, Completion, QueueStore, Store, StoreError};

/// Largest device: as many extents as the map's slot has entries for.
const MAX_EXTENTS: u64 = (EXTENT - MAP_HEADER) / 4;

/// Slots per chunk.
pub(super) const CHUNK_SLOTS: u32 = (BACKOFF_STEP / EXTENT) as u32;

/// How a device is laid out in its slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Pages carry checksums (in the slots after the map's, or in a
    /// compressed device's page map entries).
    pub(crate) integrity: bool,
    pub(crate) compress: Compress,
}

impl Layout {
    /// Slots before the data of a device of `size` bytes: the map's, then
    /// a compressed device's page map, or a plain device's checksums.
    pub(crate) fn reserved(self, size: u64) -> u32 {
        let after = if self.compress.is_on() {
            packed::page_map_slots(size)
        } else if self.integrity {
            sum_slots(size.div_ceil(EXTENT) as u32)
        } else {
            0
        };
        MAP_SLOT + 1 + after
    }

    /// Extents the map names: the device's, or a compressed device's
    /// pool extents.
    pub(crate) fn map_extents(self, size: u64) -> u32 {
        if self.compress.is_on() {
            packed::pool_extents(size)
        } else {
            size.div_ceil(EXTENT) as u32
        }
    }

    /// Slots (each [`EXTENT`]) a device of `size` bytes takes when it
    /// holds all it may: one per extent plus the reserved ones.
    pub(crate) fn slots(self, size: u64) -> u32 {
        self.map_extents(size) + self.reserved(size)
    }

    /// The largest plain device whose layout fits in `slots` slots.
    pub(crate) fn size_in(self, slots: u32) -> u64 {
        let extents = slots.saturating_sub(self.reserved(u64::from(slots) * EXTENT));
        u64::from(extents) * EXTENT
    }
}

/// Length of chunk `i` of a layout of `slots` slots.
fn chunk_len(i: u32, slots: u32) -> usize {
    let first = i * CHUNK_SLOTS;
    (slots.saturating_sub(first).min(CHUNK_SLOTS) as u64 * EXTENT) as usize
}

#[derive(Clone, Debug)]
pub struct CudaStoreOptions {
    /// The ceiling: the store takes what VRAM allows, in 512 MiB steps.
    pub size: u64,
    pub gpu: u32,
    /// VRAM left free for the display and other GPU work.
    pub reserve: u64,
    /// Which requests the copy kernel moves.
    pub copy: CopyPolicy,
    /// Every page carries a checksum, checked on every read; None
    /// (auto): where the GPU's memory has no ECC of its own (GeForce
    /// GDDR), since a GPU with ECC on finds those errors itself and the
    /// checksums cost a few microseconds per lone request.
    pub integrity: Option<bool>,
    /// How pages are kept: whole, or compressed (the device may then be
    /// larger than the VRAM it holds).
    pub compress: Compress,
}

impl CudaStoreOptions {
    /// The defaults for `size` bytes on GPU `gpu`.
    pub fn new(size: u64, gpu: u32) -> CudaStoreOptions {
        CudaStoreOptions {
            size,
            gpu,
            reserve: 512 << 20,
            copy: CopyPolicy::AUTO,
            integrity: None,
            compress: Compress::Off,
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
    /// Slots in the reserved range (its length / EXTENT).
    slots: u32,
    /// The chunks held, a prefix of the layout. The lock also makes giving
    /// back and taking back one at a time.
    chunks: Mutex<Vec<Chunk>>,
    pub(crate) extents: Arc<ExtentMap>,
    name: String,
    /// Zero the VRAM when dropped. Off while a supervisor holds the
    /// memory for the next server: a server that fails must not wipe it.
    erase_on_drop: AtomicBool,
    kernel: Option<CopyKernel>,
    copy: CopyPolicy,
    integrity: bool,
    compress: Compress,
    /// A compressed device's page kernels and shared state.
    page_kernels: Option<PageKernels>,
    pub(crate) packed: Option<Arc<Packed>>,
    /// The driver's CUDA version (e.g. 12080 for 12.8).
    driver_version: i32,
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
        let layout = Layout {
            integrity: opts.integrity.unwrap_or(false),
            compress: opts.compress,
        };
        if u64::from(layout.map_extents(opts.size)) > MAX_EXTENTS {
            return Err(StoreError::TooLarge(format!(
                "a cuda device holds at most {} GiB",
                (MAX_EXTENTS * EXTENT) >> 30
            )));
        }
        let mut store = Self::open_device(opts.gpu)?;
        store.integrity = store.resolve_integrity(opts.integrity)?;
        store.load_kernel(opts.copy);
        store.load_page_kernels(opts.compress)?;
        store.allocate(opts)?;
        store.write_empty_map()?;
        Ok(store)
    }

    /// Rebuilds a store in this process from VRAM another process
    /// allocated and exported (its chunks' lengths and fds, in order), as
    /// a recovering server does with what its supervisor held. The data is
    /// what the dead server left, found through the map it left. `opts`
    /// are the device's (its size, GPU, copy policy and integrity), as
    /// when it was created.
    pub fn import(
        opts: &CudaStoreOptions,
        chunks: &[(usize, BorrowedFd)],
    ) -> Result<CudaStore, StoreError> {
        let size = opts.size;
        let mut store = Self::open_device(opts.gpu)?;
        store.integrity = store.resolve_integrity(opts.integrity)?;
        store.load_kernel(opts.copy);
        store.load_page_kernels(opts.compress)?;
        store.size = size;
        store.slots = store.layout().slots(size);
        let layout: Vec<usize> = (0..chunks.len() as u32)
            .map(|i| chunk_len(i, store.slots))
            .collect();
        let lens: Vec<usize> = chunks.iter().map(|(l, _)| *l).collect();
        if chunks.is_empty() || lens != layout {
            return Err(StoreError::Invalid(format!(
                "imported VRAM comes in chunks of {lens:?} bytes; a {size}-byte device is laid out as {layout:?}"
            )));
        }
        let mut held = Vec::new();
        for (len, fd) in chunks {
            let own = duplicate(*fd)?;
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
            held.push(Chunk {
                handle,
                len: *len,
                fd: own,
            });
        }
        *store.chunks.get_mut().unwrap_or_else(|p| p.into_inner()) = held;
        store.map_range()?;
        store.read_map()?;
        log::info!(
            "cuda store: {} MiB on {} imported from {} chunks ({} MiB held, {} MiB in use)",
            size >> 20,
            store.name,
            chunks.len(),
            store.held_bytes() >> 20,
            store.used_bytes() >> 20
        );
        Ok(store)
    }

    /// What a standby server holds on the GPU before it imports any VRAM:
    /// GPU `gpu`'s primary context, made current, and the copy kernel
    /// loaded in it. For measuring what that context costs in VRAM.
    pub fn context_only(gpu: u32) -> Result<CudaStore, StoreError> {
        let mut store = Self::open_device(gpu)?;
        store.load_kernel(CopyPolicy::AUTO);
        Ok(store)
    }

    /// GPU `gpu`'s primary context, made current, with nothing loaded
    /// (what the probe reads the GPU through).
    pub(crate) fn context_only_plain(gpu: u32) -> Result<CudaStore, StoreError> {
        Self::open_device(gpu)
    }

    /// The CUDA device this store is on.
    pub(crate) fn device_handle(&self) -> sys::CUdevice {
        self.device
    }

    /// Copies of each chunk's fd with its length, in mapping order: what
    /// [`import`] needs in another process.
    ///
    /// [`import`]: CudaStore::import
    pub fn exported_chunks(&self) -> Result<Vec<(usize, OwnedFd)>, StoreError> {
        self.lock_chunks()
            .iter()
            .map(|c| Ok((c.len, duplicate(c.fd.as_fd())?)))
            .collect()
    }

    fn lock_chunks(&self) -> MutexGuard<'_, Vec<Chunk>> {
        self.chunks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes of VRAM held now (the chunks mapped).
    pub fn held_bytes(&self) -> u64 {
        self.lock_chunks().iter().map(|c| c.len as u64).sum()
    }

    /// Bytes of VRAM that hold data: mapped extents, the map and the
    /// checksums.
    pub fn used_bytes(&self) -> u64 {
        u64::from(self.extents.mapped() + self.extents.reserved()) * EXTENT
    }

    /// Bytes of VRAM the map and the checksums take (held while the
    /// device is).
    pub fn reserved_bytes(&self) -> u64 {
        u64::from(self.extents.reserved()) * EXTENT
    }

    /// Bytes of VRAM the whole device takes when it holds all it may.
    pub fn full_bytes(&self) -> u64 {
        u64::from(self.slots) * EXTENT
    }

    /// Loads the copy kernel unless the copy engines alone were asked for;
    /// a kernel that does not load leaves the store on the copy engines
    /// (page checksums then all computed on the CPU).
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

    /// For a compressed device: loads the page kernels, which (with the
    /// copy kernel) every round uses; without them such a device cannot
    /// serve, so this fails with one sentence.
    fn load_page_kernels(&mut self, compress: Compress) -> Result<(), StoreError> {
        self.compress = compress;
        if !compress.is_on() {
            return Ok(());
        }
        if self.kernel.is_none() {
            return Err(StoreError::Invalid(
                "a compressed device moves its pages with the copy kernel: --compress needs \
                 --copy-mode auto (the kernel did not load, or dma mode was asked for)"
                    .into(),
            ));
        }
        self.page_kernels = Some(PageKernels::load()?);
        Ok(())
    }

    /// How this device is laid out in its slots.
    pub(crate) fn layout(&self) -> Layout {
        Layout {
            integrity: self.integrity,
            compress: self.compress,
        }
    }

    /// How the device keeps its pages.
    pub fn compress(&self) -> Compress {
        self.compress
    }

    /// What a compressed device's pages hold (None for a plain device).
    pub fn packed_usage(&self) -> Option<PackedUsage> {
        self.packed.as_ref().map(|p| p.usage())
    }

    /// Whether pages carry checksums: as asked, or (None) where the GPU's
    /// memory has no ECC on.
    fn resolve_integrity(&self, asked: Option<bool>) -> Result<bool, StoreError> {
        if let Some(on) = asked {
            return Ok(on);
        }
        // SAFETY: a device the driver returned (open_device).
        let ecc = checked(
            unsafe {
                result::device::get_attribute(
                    self.device,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_ECC_ENABLED,
                )
            },
            "asking whether the GPU's memory has ECC",
        )?;
        let on = ecc == 0;
        log::info!(
            "cuda store: {} has ECC {}: page checksums {} (--integrity auto)",
            self.name,
            if ecc == 0 { "off" } else { "on" },
            if on { "on" } else { "off" }
        );
        Ok(on)
    }

    /// Reads this server failed because a page did not match its checksum.
    pub fn integrity_errors(&self) -> u64 {
        crate::queue::integrity_errors()
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
        let driver_version = init()?;
        let count = checked(result::device::get_count(), "cuDeviceGetCount")?;
        if gpu as i64 >= count as i64 {
            return Err(StoreError::Invalid(format!(
                "--gpu {gpu}: this machine has {count} CUDA device(s)"
            )));
        }
        let device = checked(result::device::get(gpu as i32), "cuDeviceGet")?;
        let name = checked(result::device::get_name(device), "cuDeviceGetName")?;
        // SAFETY: a device the driver returned just above.
        let ctx = checked(
            unsafe { result::primary_ctx::retain(device) },
            "cuDevicePrimaryCtxRetain",
        )?;
        // SAFETY: the context retained just above.
        checked(unsafe { result::ctx::set_current(ctx) }, "cuCtxSetCurrent")?;
        Ok(CudaStore {
            ctx,
            device,
            base: 0,
            size: 0,
            slots: 0,
            chunks: Mutex::new(Vec::new()),
            extents: Arc::new(ExtentMap::new(0, 0, 0)),
            name,
            erase_on_drop: AtomicBool::new(true),
            kernel: None,
            copy: CopyPolicy::DMA,
            integrity: false,
            compress: Compress::Off,
            page_kernels: None,
            packed: None,
            driver_version,
        })
    }

    /// Slots the chunks held cover.
    fn held_slots(&self) -> u32 {
        (self.held_bytes() / EXTENT) as u32
    }

    /// Makes this store's context current on the calling thread (for
    /// tools that call the driver beside the store).
    pub fn make_current(&self) -> Result<(), StoreError> {
        // SAFETY: the context is retained for the store's lifetime.
        checked(
            unsafe { result::ctx::set_current(self.ctx) },
            "cuCtxSetCurrent",
        )
    }

    pub fn gpu_name(&self) -> &str {
        &self.name
    }

    /// The CUDA version the driver supports, as it says it (12080: 12.8).
    pub fn driver_version(&self) -> i32 {
        self.driver_version
    }

    /// Zeroes every data slot held (swap pages can hold secrets); the map
    /// stays, so what it names reads as zeros.
    pub fn erase(&self) -> Result<(), StoreError> {
        if self.base == 0 {
            // Never mapped (creation failed): nothing readable to erase.
            return Ok(());
        }
        let data = self.held_bytes().saturating_sub(EXTENT) as usize;
        self.make_current()?;
        // SAFETY: the held bytes from the start of the range are ours and
        // mapped, the data slots after the map's; no queue is left.
        unsafe { self.zero_now(self.slot_addr(MAP_SLOT + 1), data, "erasing VRAM") }
    }

    pub(crate) fn slot_addr(&self, slot: u32) -> u64 {
        slot_addr(self.base, slot)
    }

    fn entry_addr(&self, e: u32) -> u64 {
        entry_addr(self.base, e)
    }
}

/// A copy of a VRAM chunk's fd.
fn duplicate(fd: BorrowedFd) -> Result<OwnedFd, StoreError> {
    fd.try_clone_to_owned().map_err(|e| StoreError::Os {
        what: "duplicating a VRAM fd".into(),
        source: e,
    })
}

impl Drop for CudaStore {
    fn drop(&mut self) {
        if self.erase_on_drop.load(Ordering::SeqCst) {
            if let Err(e) = self.erase() {
                log::error!("could not erase VRAM before release: {e}");
            }
        }
        let held = self.held_bytes();
        // The modules go while their context is still retained.
        drop(self.kernel.take());
        drop(self.page_kernels.take());
        let chunks = std::mem::take(self.chunks.get_mut().unwrap_or_else(|p| p.into_inner()));
        // SAFETY: unmapping and releasing what this store mapped; no queue is
        // left (they hold an Arc to the store).
        unsafe {
            if self.base != 0 {
                sys::cuMemUnmap(self.base, held as usize);
                sys::cuMemAddressFree(self.base, self.full_bytes() as usize);
            }
            for c in &chunks {
                sys::cuMemRelease(c.handle);
            }
            let _ = result::primary_ctx::release(self.device);
        }
        log::info!("cuda store: {} MiB unmapped and released", held >> 20);
    }
}

impl Store for CudaStore {
    type Queue = StoreQueue;

    fn size(&self) -> u64 {
        self.size
    }

    fn describe(&self) -> String {
        format!("cuda {}", self.name)
    }

    fn open_queue(&self, qid: u16, buffers: &BufferRegion) -> Result<StoreQueue, StoreError> {
        if let (Some(packed), Some(kernels), Some(copy)) =
            (&self.packed, &self.page_kernels, &self.kernel)
        {
            let path = packed::PackedPath {
                copy: copy.function,
                pages: kernels.launcher(),
                packed: Arc::clone(packed),
            };
            return PackedQueue::open(
                qid,
                self.ctx,
                self.base,
                self.extents.clone(),
                buffers,
                path,
                self.name.as_str().into(),
            )
            .map(StoreQueue::Packed);
        }
        let path = CopyPath {
            kernel: self.kernel.as_ref().map(|k| k.function),
            policy: self.copy,
            integrity: self.integrity,
            // cuStreamWriteValue32_v2 is a CUDA 12 entry point; cudarc
            // panics on a symbol the driver lacks, so older drivers never
            // reach it.
            stream_writes: self.driver_version >= 12000,
        };
        CudaQueue::open(
            self.ctx,
            self.base,
            self.extents.clone(),
            buffers,
            path,
            self.name.as_str().into(),
        )
        .map(StoreQueue::Plain)
    }

    fn backing_layout(&self) -> Vec<u64> {
        self.lock_chunks().iter().map(|c| c.len as u64).collect()
    }

    fn integrity(&self) -> bool {
        self.integrity
    }
}

/// A queue of either kind of device.
pub enum StoreQueue {
    Plain(CudaQueue),
    Packed(PackedQueue),
}

impl QueueStore for StoreQueue {
    fn submit(&mut self, batch: &mut Vec<vramblk_store::Request>, done: &mut Vec<Completion>) {
        match self {
            StoreQueue::Plain(q) => q.submit(batch, done),
            StoreQueue::Packed(q) => q.submit(batch, done),
        }
    }

    fn poll(&mut self, done: &mut Vec<Completion>) {
        match self {
            StoreQueue::Plain(q) => q.poll(done),
            StoreQueue::Packed(q) => q.poll(done),
        }
    }

    fn in_flight(&self) -> usize {
        match self {
            StoreQueue::Plain(q) => q.in_flight(),
            StoreQueue::Packed(q) => q.in_flight(),
        }
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
