//! Allocating, exporting, erasing, giving back and taking back the
//! device's VRAM.
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

use crate::driver::{check, checked, describe, init, SyncStream};
use crate::extents::{entry_addr, slot_addr, ExtentMap, EXTENT, MAP_HEADER, MAP_SLOT};
use crate::integrity::sum_slots;
use crate::kernel::CopyKernel;
use crate::queue::{CopyPath, CudaQueue};
use crate::{CopyPolicy, BACKOFF_STEP};
use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vramblk_store::{BufferRegion, Store, StoreError};

/// The map's header: magic, then the extent count (u64), then the layout's
/// flags (u64), then padding.
const MAP_MAGIC: [u8; 8] = *b"VRAMBLK\x01";

/// Header flag: the slots after the map's hold page checksums.
const HEADER_INTEGRITY: u64 = 1;

/// Largest device: as many extents as the map's slot has entries for.
const MAX_EXTENTS: u64 = (EXTENT - MAP_HEADER) / 4;

/// Slots per chunk.
const CHUNK_SLOTS: u32 = (BACKOFF_STEP / EXTENT) as u32;

/// How long giving VRAM back waits for requests on one extent to finish.
const MOVE_WAIT: Duration = Duration::from_secs(2);

/// Slots before the data of a device of `size` bytes: the map's, and with
/// integrity the checksums'.
fn reserved_for(size: u64, integrity: bool) -> u32 {
    let sums = if integrity {
        sum_slots(size.div_ceil(EXTENT) as u32)
    } else {
        0
    };
    MAP_SLOT + 1 + sums
}

/// Slots (each [`EXTENT`]) a device of `size` bytes needs: one per extent
/// plus the reserved ones.
fn slots_for(size: u64, integrity: bool) -> u32 {
    size.div_ceil(EXTENT) as u32 + reserved_for(size, integrity)
}

/// The largest device whose layout fits in `slots` slots.
fn size_in(slots: u32, integrity: bool) -> u64 {
    let extents = slots.saturating_sub(reserved_for(u64::from(slots) * EXTENT, integrity));
    u64::from(extents) * EXTENT
}

/// Length of chunk `i` of a layout of `slots` slots.
fn chunk_len(i: u32, slots: u32) -> usize {
    let first = i * CHUNK_SLOTS;
    (slots.saturating_sub(first).min(CHUNK_SLOTS) as u64 * EXTENT) as usize
}

/// What giving VRAM back did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resized {
    /// VRAM held before and after, bytes.
    pub before: u64,
    pub after: u64,
    /// Extents moved to make whole chunks free.
    pub moved: u32,
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
        if opts.size.div_ceil(EXTENT) > MAX_EXTENTS {
            return Err(StoreError::TooLarge(format!(
                "a cuda device holds at most {} GiB",
                (MAX_EXTENTS * EXTENT) >> 30
            )));
        }
        let mut store = Self::open_device(opts.gpu)?;
        store.integrity = store.resolve_integrity(opts.integrity)?;
        store.load_kernel(opts.copy);
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
        store.size = size;
        store.slots = slots_for(size, store.integrity);
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

    /// Bytes a give-back to nothing would free now: what is held beyond
    /// the whole chunks the data needs.
    pub fn unused_bytes(&self) -> u64 {
        let lens: Vec<u64> = self.lock_chunks().iter().map(|c| c.len as u64).collect();
        unused_of(&lens, self.extents.mapped() + self.extents.reserved())
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
            driver_version,
        })
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

    /// Free VRAM on the GPU now, bytes.
    fn free_vram(&self) -> Result<u64, StoreError> {
        let (free, _total) = checked(result::mem_get_info(), "cuMemGetInfo")?;
        Ok(free as u64)
    }

    fn allocate(&mut self, opts: &CudaStoreOptions) -> Result<(), StoreError> {
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
        // The map's slot (and the checksums') come on top of the device.
        let overhead = u64::from(reserved_for(opts.size, self.integrity)) * EXTENT;
        let target = granted_target(opts.size, free.saturating_sub(overhead), opts.reserve);
        if target == 0 {
            return Err(StoreError::TooLarge(format!(
                "VRAM short on {}: {} MiB free, {} MiB kept in reserve, not even {} MiB left for the device",
                self.name,
                free >> 20,
                opts.reserve >> 20,
                BACKOFF_STEP >> 20
            )));
        }
        // A failure stops on a chunk boundary: the device shrinks to what
        // the chunks got hold, less the map's slot and the checksums'.
        let mut size = target;
        let mut chunks = Vec::new();
        let mut i = 0;
        let integrity = self.integrity;
        while i < slots_for(size, integrity).div_ceil(CHUNK_SLOTS) {
            match self.create_chunk(chunk_len(i, slots_for(size, integrity)), &prop) {
                Ok(c) => chunks.push(c),
                Err(e) if i > 0 => {
                    size = size_in(i * CHUNK_SLOTS, integrity);
                    log::warn!("VRAM allocation stopped at {} MiB: {e}", size >> 20);
                    break;
                }
                Err(e) => return Err(e),
            }
            i += 1;
        }
        self.size = size;
        self.slots = slots_for(size, integrity);
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
    fn map_range(&mut self) -> Result<(), StoreError> {
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
    fn map_chunk(&self, i: u32, c: &Chunk) -> Result<(), StoreError> {
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

    /// A fresh device: every slot zero (a free slot always is), every
    /// extent unmapped, all slots held usable.
    fn write_empty_map(&mut self) -> Result<(), StoreError> {
        let extents = self.size.div_ceil(EXTENT) as u32;
        let mut header = [0u8; MAP_HEADER as usize];
        header[..8].copy_from_slice(&MAP_MAGIC);
        header[8..16].copy_from_slice(&u64::from(extents).to_le_bytes());
        header[16..24].copy_from_slice(&self.header_flags().to_le_bytes());
        let held = self.held_bytes() as usize;
        // SAFETY: the held bytes from the start of the range are mapped
        // (slot 0 among them) and no queue runs yet; the header is a live
        // local array.
        unsafe {
            self.zero_now(self.base, held, "zeroing the new VRAM")?;
            checked(
                result::memcpy_htod_sync(self.base, &header),
                "writing the extent map",
            )?;
            checked(result::ctx::synchronize(), "writing the extent map")?;
        }
        let held = self.held_slots();
        let reserved = reserved_for(self.size, self.integrity);
        self.extents = Arc::new(ExtentMap::with_reserved(
            extents, self.slots, held, reserved,
        ));
        Ok(())
    }

    fn header_flags(&self) -> u64 {
        if self.integrity {
            HEADER_INTEGRITY
        } else {
            0
        }
    }

    /// For a server taking over imported VRAM, once the server that used
    /// it before is gone: reads the map again (a standby imported it long
    /// before; the old server has mapped and unmapped extents since) and
    /// zeroes every slot it does not name, which the old server may have
    /// been freeing or moving from when it died (free slots must be zero).
    pub fn take_over(&mut self) -> Result<(), StoreError> {
        self.make_current()?;
        self.read_map()?;
        for (first, count) in self.extents.free_runs() {
            // SAFETY: free slots of held chunks (under the capacity read
            // with the map): mapped, named by no extent, and no other
            // server runs on this VRAM any more.
            unsafe {
                self.zero_now(
                    self.slot_addr(first),
                    (u64::from(count) * EXTENT) as usize,
                    "zeroing free VRAM",
                )?
            };
        }
        Ok(())
    }

    /// Zeroes `len` bytes of VRAM at `at` and waits for it: the queues'
    /// streams do not wait for the default one.
    ///
    /// # Safety
    /// The range is mapped and no stream uses it meanwhile.
    unsafe fn zero_now(&self, at: u64, len: usize, what: &str) -> Result<(), StoreError> {
        // SAFETY: as the caller promised; then a wait on this context.
        checked(unsafe { result::memset_d8_sync(at, 0, len) }, what)?;
        checked(result::ctx::synchronize(), what)
    }

    /// Reads back the map a previous server left in slot 0.
    fn read_map(&mut self) -> Result<(), StoreError> {
        let extents = self.size.div_ceil(EXTENT) as u32;
        let mut bytes = vec![0u8; (MAP_HEADER + 4 * u64::from(extents)) as usize];
        // SAFETY: slot 0 is mapped and at least this long (create checked
        // the extent count against it); the buffer is ours.
        checked(
            unsafe { result::memcpy_dtoh_sync(&mut bytes, self.base) },
            "reading the extent map",
        )?;
        let recorded = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default());
        if bytes[..8] != MAP_MAGIC || recorded != u64::from(extents) {
            return Err(StoreError::Invalid(format!(
                "the imported VRAM holds no extent map for a {} MiB device (left by an older vramblk?)",
                self.size >> 20
            )));
        }
        let flags = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or_default());
        if flags != self.header_flags() {
            let on_off = |f: u64| {
                if f & HEADER_INTEGRITY != 0 {
                    "on"
                } else {
                    "off"
                }
            };
            return Err(StoreError::Invalid(format!(
                "the imported VRAM was laid out with integrity {}, this server has it {}",
                on_off(flags),
                on_off(self.header_flags())
            )));
        }
        let entries: Vec<u32> = bytes[MAP_HEADER as usize..]
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        let held = self.held_slots();
        let reserved = reserved_for(self.size, self.integrity);
        self.extents = Arc::new(
            ExtentMap::from_entries(&entries, self.slots, held, reserved)
                .map_err(|e| StoreError::Invalid(format!("the imported extent map: {e}")))?,
        );
        Ok(())
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

    /// Gives VRAM back while the device stays up: moves the data of the
    /// last chunks into free slots of the first ones, then frees those
    /// chunks, down to `target` bytes held or to what the data needs,
    /// whichever is more. The caller tells the fds' other holders to let
    /// the freed chunks go.
    pub fn give_back(&self, target: u64) -> Result<Resized, StoreError> {
        let mut chunks = self.lock_chunks();
        self.make_current()?;
        let before: u64 = chunks.iter().map(|c| c.len as u64).sum();
        let held_slots = (before / EXTENT) as u32;
        let keep_chunks = chunks_kept(target, self.extents.mapped() + self.extents.reserved());
        if keep_chunks as usize >= chunks.len() {
            return Ok(Resized {
                before,
                after: before,
                moved: 0,
            });
        }
        let keep_slots = keep_chunks * CHUNK_SLOTS;
        self.extents.set_capacity(keep_slots);
        let moved = match self.empty_slots_from(keep_slots) {
            Ok(n) => n,
            Err(e) => {
                self.extents.set_capacity(held_slots);
                return Err(e);
            }
        };
        for (i, c) in chunks.drain(keep_chunks as usize..).enumerate() {
            let at = self.base + u64::from(keep_chunks + i as u32) * BACKOFF_STEP;
            // SAFETY: no extent lives in this chunk any more and no slot in
            // it can be handed out (capacity), so no copy touches it.
            unsafe {
                check(sys::cuMemUnmap(at, c.len), "cuMemUnmap")?;
                check(sys::cuMemRelease(c.handle), "cuMemRelease")?;
            }
        }
        let after = chunks.iter().map(|c| c.len as u64).sum();
        log::info!(
            "cuda store: gave back {} MiB of VRAM ({} MiB held, {} extents moved)",
            (before - after) >> 20,
            after >> 20,
            moved
        );
        Ok(Resized {
            before,
            after,
            moved,
        })
    }

    /// Moves every extent living in slot `from` or above below it; waits
    /// for slots a writer took there before the capacity fell.
    fn empty_slots_from(&self, from: u32) -> Result<u32, StoreError> {
        let stream = SyncStream::new()?;
        let deadline = Instant::now() + MOVE_WAIT;
        let mut moved = 0;
        loop {
            for e in self.extents.mapped_at_or_above(from) {
                if self.move_extent(e, from, &stream)? {
                    moved += 1;
                }
            }
            if self.extents.mapped_at_or_above(from).is_empty()
                && !self.extents.any_taken_from(from)
            {
                return Ok(moved);
            }
            if Instant::now() > deadline {
                return Err(StoreError::Unavailable(
                    "requests kept the last chunks busy; nothing was given back".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Moves extent `e` into a free slot under `below`; false when it needs
    /// no move any more (unmapped or below meanwhile).
    fn move_extent(&self, e: u32, below: u32, stream: &SyncStream) -> Result<bool, StoreError> {
        let deadline = Instant::now() + MOVE_WAIT;
        let from = loop {
            if self.extents.slot_of(e).is_none_or(|s| s < below) {
                return Ok(false);
            }
            if let Some(s) = self.extents.begin_move(e) {
                break s;
            }
            if Instant::now() > deadline {
                return Err(StoreError::Unavailable(format!(
                    "extent {e} stayed in use; nothing was given back"
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        let Some(to) = self.extents.take_below(below) else {
            self.extents.abort_move(e);
            return Err(StoreError::Unavailable(
                "no free slot to move data into; nothing was given back".into(),
            ));
        };
        // SAFETY: both slots are mapped and nobody else touches them (the
        // extent is moving, the target slot is freshly taken); the entry
        // lies in the map's slot. The map names the new slot only once the
        // data is there, and the old slot is zero before it is free.
        let copied = unsafe {
            stream
                .copy(self.slot_addr(to), self.slot_addr(from), EXTENT as usize)
                .and_then(|()| stream.put_u32(self.entry_addr(e), to + 1))
                .and_then(|()| stream.zero(self.slot_addr(from), EXTENT as usize))
                .and_then(|()| stream.wait())
        };
        if let Err(err) = copied {
            self.extents.free(to);
            self.extents.abort_move(e);
            return Err(err);
        }
        self.extents.end_move(e, to);
        Ok(true)
    }

    /// Takes VRAM back up to `target` bytes held (at most the whole
    /// device), chunk by chunk, while the GPU keeps `floor` bytes free.
    /// The new chunks are not used until [`open_held`]: the caller first
    /// hands their fds to the other holders, so no data lands in VRAM that
    /// a crash would lose. Returns the bytes held now.
    ///
    /// [`open_held`]: CudaStore::open_held
    pub fn take_back(&self, target: u64, floor: u64) -> Result<u64, StoreError> {
        let mut chunks = self.lock_chunks();
        self.make_current()?;
        let want =
            (target.div_ceil(EXTENT).min(u64::from(self.slots)) as u32).div_ceil(CHUNK_SLOTS);
        let prop = self.prop();
        while (chunks.len() as u32) < want {
            let i = chunks.len() as u32;
            let len = chunk_len(i, self.slots);
            let free = self.free_vram()?;
            if free < len as u64 + floor {
                log::info!(
                    "cuda store: {} MiB free on {}; not taking {} MiB more (keeping {} MiB free)",
                    free >> 20,
                    self.name,
                    len >> 20,
                    floor >> 20
                );
                break;
            }
            let c = self.create_chunk(len, &prop)?;
            let at = self.base + u64::from(i) * BACKOFF_STEP;
            let mapped = self.map_chunk(i, &c).and_then(|()| {
                // SAFETY: just mapped, ours, beyond the capacity (no queue
                // writes there yet); free slots must be zero.
                unsafe { self.zero_now(at, len, "zeroing new VRAM") }
            });
            if let Err(e) = mapped {
                // SAFETY: the handle is ours; unmapping what may be mapped.
                unsafe {
                    sys::cuMemUnmap(at, len);
                    sys::cuMemRelease(c.handle);
                }
                return Err(e);
            }
            chunks.push(c);
        }
        Ok(chunks.iter().map(|c| c.len as u64).sum())
    }

    /// Lets writes use every slot held (after [`take_back`]).
    ///
    /// [`take_back`]: CudaStore::take_back
    pub fn open_held(&self) {
        let held = self.held_slots();
        self.extents.set_capacity(held);
    }

    /// Room for new data, bytes: free slots under the capacity.
    pub fn room_bytes(&self) -> u64 {
        u64::from(self.extents.free_slots()) * EXTENT
    }

    /// Waits up to `limit` for a write that found no room (it waits, its
    /// queue retrying, until [`room_answer`]); whether one came.
    ///
    /// [`room_answer`]: CudaStore::room_answer
    pub fn wait_room_wanted(&self, limit: Duration) -> bool {
        self.extents.wait_room_wanted(limit)
    }

    /// Whether VRAM was taken back for waiting writes; false makes writes
    /// with no room fail (ENOSPC) until a slot frees or VRAM is had.
    pub fn room_answer(&self, grew: bool) {
        self.extents.room_answer(grew)
    }

    pub fn room_refused(&self) -> bool {
        self.extents.room_refused()
    }

    /// Where the data of device byte `offset` lives in VRAM; None when its
    /// extent holds no data.
    fn vram_of(&self, offset: u64) -> Option<u64> {
        let slot = self.extents.slot_of(u32::try_from(offset / EXTENT).ok()?)?;
        Some(self.slot_addr(slot) + offset % EXTENT)
    }

    /// Test hook: flips the lowest bit of the byte at device `offset` in
    /// VRAM, leaving its checksum as it was, as a bit flipped in the memory
    /// itself would. False (nothing done) when its extent holds no data.
    pub fn flip_bit(&self, offset: u64) -> Result<bool, StoreError> {
        let Some(at) = self.vram_of(offset) else {
            return Ok(false);
        };
        self.make_current()?;
        let mut byte = [0u8];
        // SAFETY: `at` lies in a mapped slot; a one-byte local buffer.
        unsafe {
            checked(
                result::memcpy_dtoh_sync(&mut byte, at),
                "reading a byte to flip",
            )?;
            byte[0] ^= 1;
            checked(
                result::memcpy_htod_sync(at, &byte),
                "writing the flipped byte",
            )?;
        }
        Ok(true)
    }

    /// The checksum stored for the page at device `offset` (for the GPU
    /// checks, which compare it with [`crate::page_sum`] of the data); None
    /// without integrity or when its extent holds no data.
    pub fn stored_checksum(&self, offset: u64) -> Result<Option<u32>, StoreError> {
        let e = u32::try_from(offset / EXTENT).ok();
        if !self.integrity || self.vram_of(offset).is_none() {
            return Ok(None);
        }
        let Some(e) = e else { return Ok(None) };
        self.make_current()?;
        let mut sum = [0u32];
        let at = crate::integrity::sum_addr(self.base, e, offset % EXTENT);
        // SAFETY: the checksum slots are mapped (they precede the data);
        // a four-byte local buffer.
        checked(
            unsafe { result::memcpy_dtoh_sync(&mut sum, at) },
            "reading a checksum",
        )?;
        Ok(Some(sum[0]))
    }

    pub(crate) fn slot_addr(&self, slot: u32) -> u64 {
        slot_addr(self.base, slot)
    }

    fn entry_addr(&self, e: u32) -> u64 {
        entry_addr(self.base, e)
    }
}

/// Chunks a give-back down to `target` bytes keeps while `needed` slots
/// hold data (the mapped extents, the map and the checksums): at least the
/// first chunk.
fn chunks_kept(target: u64, needed: u32) -> u32 {
    let needed = target.div_ceil(EXTENT).max(u64::from(needed)) as u32;
    needed.div_ceil(CHUNK_SLOTS).max(1)
}

/// What a give-back to nothing would free from chunks of `lens` bytes
/// while `needed` slots hold data.
fn unused_of(lens: &[u64], needed: u32) -> u64 {
    lens.iter().skip(chunks_kept(0, needed) as usize).sum()
}

/// A copy of a VRAM chunk's fd.
fn duplicate(fd: BorrowedFd) -> Result<OwnedFd, StoreError> {
    fd.try_clone_to_owned().map_err(|e| StoreError::Os {
        what: "duplicating a VRAM fd".into(),
        source: e,
    })
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
        let held = self.held_bytes();
        // The module goes while its context is still retained.
        drop(self.kernel.take());
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
    }

    fn backing_layout(&self) -> Vec<u64> {
        self.lock_chunks().iter().map(|c| c.len as u64).collect()
    }

    fn integrity(&self) -> bool {
        self.integrity
    }
}

#[cfg(test)]
mod tests {
    use super::{granted_target, unused_of};

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

    #[test]
    fn unused_vram_counts_whole_chunks_beyond_what_the_data_needs() {
        // A 2 GiB device held whole: 4 chunks of 512 MiB and 2 MiB.
        let whole = [512 * MIB, 512 * MIB, 512 * MIB, 512 * MIB, 2 * MIB];
        // 258 MiB of data (128 extents and the map: 129 slots) keeps one chunk: 1538
        // MiB could go.
        assert_eq!(unused_of(&whole, 129), 1538 * MIB);
        // 600 MiB keeps two.
        assert_eq!(unused_of(&whole, 300), 1026 * MIB);
        // Nothing beyond the first chunk, or nearly full: nothing.
        assert_eq!(unused_of(&[512 * MIB], 1), 0);
        assert_eq!(unused_of(&whole, 1025), 0);
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
