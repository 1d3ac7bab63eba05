//! The copy kernel with no store around it: issue 19's ceiling for the
//! 4 KiB shapes, measured by engine-bench in the same run as the store.
//! Each queue thread launches the same kernel the store uses over a
//! descriptor table of `depth` 4 KiB pieces (its own pinned, device-mapped
//! buffers to random pages of one VRAM allocation, no checksums), waits
//! for it, and goes again: no extent lookup, no request bookkeeping, no
//! round pipelining. Benchmark code: nothing in the store calls it.

use crate::kernel::{flags, CopyKernel, Desc, THREADS};
use crate::CudaStore;
use cudarc::driver::result;
use cudarc::driver::sys;
use std::time::{Duration, Instant};
use vramblk_store::StoreError;

/// VRAM the pieces land in (random 4 KiB pages of it).
const VRAM_BYTES: usize = 1 << 30;
const PAGE: usize = 4096;

fn failed(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Invalid(format!("ceiling: {what}: {e}"))
}

/// Pinned host memory mapped into the device's address space.
struct Mapped {
    host: *mut std::ffi::c_void,
    dev: sys::CUdeviceptr,
}

impl Mapped {
    fn new(len: usize) -> Result<Mapped, StoreError> {
        // SAFETY: an allocation in the current context, freed in Drop.
        let host = unsafe {
            result::malloc_host(
                len,
                sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP,
            )
        }
        .map_err(|e| failed("cuMemHostAlloc", e))?;
        let mut m = Mapped { host, dev: 0 };
        // SAFETY: a valid out-pointer and the allocation just made (the
        // result layer has no call for this one).
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut m.dev, host, 0) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(failed("cuMemHostGetDevicePointer", format!("{r:?}")));
        }
        Ok(m)
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: allocated in new(); no launch using it is in flight.
        let _ = unsafe { result::free_host(self.host) };
    }
}

/// IOPS of `queues` threads, each keeping `depth` 4 KiB pieces per launch
/// of the copy kernel, host to VRAM (`write`) or back, for `secs`.
pub fn raw_gather_iops(
    store: &CudaStore,
    queues: u16,
    depth: usize,
    write: bool,
    secs: f64,
) -> Result<f64, StoreError> {
    store.make_current()?;
    // SAFETY: an allocation in the store's context, freed below.
    let vram = unsafe { result::malloc_sync(VRAM_BYTES) }.map_err(|e| failed("cuMemAlloc", e))?;
    let start = Instant::now();
    let counts: Vec<Result<u64, StoreError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..queues)
            .map(|q| s.spawn(move || one_queue(store, vram, q, depth, write, secs)))
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(failed("a queue thread", "panicked")))
            })
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    // SAFETY: every launch using it has finished (each thread waited).
    let _ = unsafe { result::free_sync(vram) };
    let mut ios = 0;
    for c in counts {
        ios += c?;
    }
    Ok(ios as f64 / elapsed)
}

fn one_queue(
    store: &CudaStore,
    vram: sys::CUdeviceptr,
    qid: u16,
    depth: usize,
    write: bool,
    secs: f64,
) -> Result<u64, StoreError> {
    store.make_current()?;
    let kernel = CopyKernel::load()?;
    let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
        .map_err(|e| failed("cuStreamCreate", e))?;
    let buffers = Mapped::new(depth * PAGE)?;
    let table = Mapped::new(depth * std::mem::size_of::<Desc>())?;
    let descs = table.host.cast::<Desc>();
    let pages = (VRAM_BYTES / PAGE) as u64;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (u64::from(qid) << 32);
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut ios = 0u64;
    let result = loop {
        if Instant::now() >= until {
            break Ok(ios);
        }
        for i in 0..depth {
            // xorshift: a random page per piece, as random 4 KiB I/O does.
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let page = vram + (rng % pages) * PAGE as u64;
            let buf = buffers.dev + (i * PAGE) as u64;
            let (src, dst) = if write { (buf, page) } else { (page, buf) };
            let d = Desc {
                src,
                dst,
                sums: 0,
                len: PAGE as u32,
                flags: flags::COPY,
            };
            // SAFETY: i < depth entries of the table; the previous launch
            // that read it has finished (the stream was synchronised).
            unsafe { descs.add(i).write(d) };
        }
        let mut table_dev = table.dev;
        let mut n = depth as u32;
        let mut params = [
            (&mut table_dev as *mut u64).cast::<std::ffi::c_void>(),
            (&mut n as *mut u32).cast::<std::ffi::c_void>(),
        ];
        // SAFETY: the parameters match copy_list(u64, u32); the table and
        // every address in it stay valid until the stream is synchronised.
        let r = unsafe {
            sys::cuLaunchKernel(
                kernel.function,
                n,
                1,
                1,
                THREADS,
                1,
                1,
                0,
                stream,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            break Err(failed("cuLaunchKernel", format!("{r:?}")));
        }
        // SAFETY: a stream of ours.
        if let Err(e) = unsafe { result::stream::synchronize(stream) } {
            break Err(failed("cuStreamSynchronize", e));
        }
        ios += depth as u64;
    };
    // SAFETY: synchronised above (or never launched on).
    let _ = unsafe { result::stream::destroy(stream) };
    result
}
