//! The copy kernel with no store around it: issue 19's ceiling for the
//! 4 KiB shapes, measured by engine-bench in the same run as the store.
//! Each queue thread launches the same kernel the store uses over a
//! descriptor table of `depth` 4 KiB pieces (its own pinned, device-mapped
//! buffers to random pages of one VRAM allocation, no checksums), waits
//! for it, and goes again: no extent lookup, no request bookkeeping, no
//! round pipelining. Benchmark code: nothing in the store calls it.

use crate::kernel::{self, flags, CopyKernel, Desc};
use crate::pinned::{DescTable, PinnedTable};
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
    let copy = CopyKernel::load()?;
    let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
        .map_err(|e| failed("cuStreamCreate", e))?;
    // The io buffers and the descriptor table, as a queue has them.
    let mut buffers = PinnedTable::<[u8; PAGE]>::empty();
    let mut descs = DescTable::empty();
    let moved = buffers
        .reserve(depth)
        .and_then(|()| descs.reserve(depth))
        .and_then(|()| {
            launch_rounds(
                &copy, stream, vram, &buffers, &mut descs, qid, depth, write, secs,
            )
        });
    buffers.free();
    descs.free();
    // SAFETY: synchronised in every round (or never launched on).
    let _ = unsafe { result::stream::destroy(stream) };
    moved
}

/// Rounds of `depth` 4 KiB pieces between `buffers` and random pages of
/// `vram`, each launched and waited for, until `secs` pass; how many
/// pieces moved.
#[allow(clippy::too_many_arguments)]
fn launch_rounds(
    copy: &CopyKernel,
    stream: sys::CUstream,
    vram: sys::CUdeviceptr,
    buffers: &PinnedTable<[u8; PAGE]>,
    descs: &mut DescTable,
    qid: u16,
    depth: usize,
    write: bool,
    secs: f64,
) -> Result<u64, StoreError> {
    let pages = (VRAM_BYTES / PAGE) as u64;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (u64::from(qid) << 32);
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut ios = 0u64;
    while Instant::now() < until {
        // The previous launch that read the table has finished (the
        // stream was synchronised): it may be rewritten.
        descs.len = 0;
        for i in 0..depth {
            // xorshift: a random page per piece, as random 4 KiB I/O does.
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let page = vram + (rng % pages) * PAGE as u64;
            let buf = buffers.dev + (i * PAGE) as u64;
            let (src, dst) = if write { (buf, page) } else { (page, buf) };
            let fits = descs.push(Desc {
                src,
                dst,
                sums: 0,
                len: PAGE as u32,
                flags: flags::COPY,
            });
            if !fits {
                return Err(failed("the descriptor table", "full"));
            }
        }
        // SAFETY: the kernel loaded in this context; the table and every
        // address in it stay valid until the stream is synchronised below.
        unsafe { kernel::launch(copy.function, descs.dev, depth as u32, stream) }
            .map_err(|e| failed("cuLaunchKernel", e))?;
        // SAFETY: a stream of ours.
        unsafe { result::stream::synchronize(stream) }
            .map_err(|e| failed("cuStreamSynchronize", e))?;
        ios += depth as u64;
    }
    Ok(ios)
}
