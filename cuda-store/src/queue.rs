//! One queue's data path: its own stream, its io buffers pinned and
//! device-mapped once, one event per round of requests, completions found
//! by polling. Each request is first cut at extent boundaries and each
//! piece looked up in the extent map (pinning the extent until the round
//! ends). Within a round, pieces up to the kernel limit go out together
//! through one launch of the copy kernel; larger ones (and all of them in
//! DMA mode) as one async copy each on the copy engines.
//!
//! With integrity on, the same launch stores the checksum of every page a
//! round writes and checks the checksum of every page it reads. Pieces on
//! the copy engines have theirs computed on the CPU (the crc32 instruction,
//! about 0.2 us a page) and copied beside the data, since a launch after a
//! lone copy would double its latency. A page that does not match fails
//! its request alone with EIO.
//!
//! Nothing here allocates once the queue is open: its [`ROUNDS`] rounds
//! are made then, each with room for a round of every request at the
//! largest size, and a batch that finds every round in flight waits
//! (deferred) for one. A swap device's server is asked for pages while
//! memory is exhausted, and an allocation then may wait for memory only
//! its own device can free (docs/design.md, "No allocation while serving").

use crate::deferred::Deferred;
use crate::driver::{
    check, checked, context_lost, describe, is_context_fatal, new_stream, retried_once, SyncStream,
};
use crate::extents::{entry_addr, slot_addr, ExtentMap, PinRefused, Pinned, EXTENT};
use crate::integrity::{page_sum_cpu, sum_addr, PAGE, SUMS_PER_EXTENT};
use crate::kernel::{self, flags, Desc};
use crate::pinned::{DescTable, PinnedTable};
use crate::stages::{self, Stage};
use crate::warm;
use crate::CopyPolicy;
use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;
use vramblk_store::{BufferRegion, Completion, Op, QueueStore, Request, StoreError};

/// Writes refused for want of a free slot, over every queue (for the log).
static NO_ROOM: AtomicU64 = AtomicU64::new(0);

/// Records extent `e`'s map entry as `entry` (slot + 1, or 0) on `stream`,
/// after zeroing `zero` (a slot being freed) and the checksums at `sums`
/// if given, and waits for it all; false (logged) when it failed. Shared
/// by both kinds of queue.
pub(crate) fn record_extent(
    stream: &SyncStream,
    base: u64,
    e: u32,
    entry: u32,
    zero: Option<u32>,
    sums: Option<u64>,
) -> bool {
    // SAFETY: the entry lies in the map's slot; a slot to zero is this
    // extent's, held "moving" by the caller (or just taken for it), so
    // nothing else touches it; so are its checksums.
    let recorded = unsafe {
        zero.map_or(Ok(()), |s| stream.zero(slot_addr(base, s), EXTENT as usize))
            .and_then(|()| sums.map_or(Ok(()), |at| stream.zero(at, SUMS_PER_EXTENT as usize)))
            .and_then(|()| stream.put_u32(entry_addr(base, e), entry))
            .and_then(|()| stream.wait())
    };
    if let Err(err) = &recorded {
        log::error!("recording extent {e} in the map: {err}");
    }
    recorded.is_ok()
}

/// Launches the copy kernel `function` over `descs` on `stream` (nothing
/// when the table is empty); false, logged, when the launch failed. Shared
/// by both kinds of queue.
pub(crate) fn launch_table(
    function: sys::CUfunction,
    descs: &DescTable,
    stream: sys::CUstream,
) -> bool {
    if descs.len == 0 {
        return true;
    }
    let n = descs.len as u32;
    // SAFETY: the store's kernel; the table and every address in it stay
    // valid until the round's event completes (the callers' rounds hold
    // them).
    let r = retried_once("copy kernel launch", || unsafe {
        kernel::launch(function, descs.dev, n, stream)
    });
    if let Err(e) = r {
        log::error!("copy kernel launch ({n} pieces): {}", describe(e));
        return false;
    }
    true
}

/// Queues the copy of each piece of `descs` (copies only, no checksum
/// flag) by the copy engine, one call a piece, in order on `stream`: for a
/// round of a few pieces that costs less than a launch (a lone compressed
/// write's block and entry, docs/benchmarks.md). False when a call failed
/// (the pieces before it may be queued).
pub(crate) fn copy_by_engine(descs: &DescTable, stream: sys::CUstream) -> bool {
    for i in 0..descs.len {
        let Some(d) = descs.get(i) else {
            return false;
        };
        // SAFETY: as for a launch of the table: both ends (VRAM, or the
        // device-mapped alias of pinned host memory) stay valid until the
        // round's event completes (the callers' rounds hold them).
        let r = retried_once("a copy", || unsafe {
            result::memcpy_dtod_async(d.dst, d.src, d.len as usize, stream)
        });
        if let Err(e) = r {
            log::error!("a copy of {} bytes: {}", d.len, describe(e));
            return false;
        }
    }
    true
}

/// Whether a round whose event on `stream` answered `r` (not "not ready")
/// did its work: a lost context ends the server (`context_lost`); an event
/// query refused by itself is settled by waiting for the stream. Shared by
/// both kinds of queue.
pub(crate) fn round_succeeded(
    r: Result<(), DriverError>,
    stream: sys::CUstream,
    what: &str,
) -> bool {
    let Err(e) = r else {
        return true;
    };
    if is_context_fatal(e) {
        context_lost(what, e);
    }
    log::warn!(
        "a round's event query failed: {}; waiting for its stream",
        describe(e)
    );
    // SAFETY: waiting on the caller's own stream.
    match checked(unsafe { result::stream::synchronize(stream) }, what) {
        Ok(()) => true,
        Err(e) => {
            log::error!("{e}");
            false
        }
    }
}

/// Counts and logs a read that found data not matching its checksum in
/// the `span` bytes at device `offset`.
pub(crate) fn report_mismatch(gpu: &str, offset: u64, span: u32) {
    let n = INTEGRITY_ERRORS.fetch_add(1, Relaxed) + 1;
    if n <= 100 || n.is_power_of_two() {
        log::error!(
            "integrity: data read from VRAM on {} does not match its checksum in the {} KiB \
             at sector {} (byte offset {offset}); that read fails with EIO ({n} so far)",
            gpu,
            span >> 10,
            offset / 512
        );
    }
}

/// Counts and logs a write refused for want of a free slot.
pub(crate) fn report_no_room() {
    let n = NO_ROOM.fetch_add(1, Relaxed);
    if n.is_power_of_two() || n == 0 {
        log::warn!(
            "a write found no free VRAM slot ({} so far): the device gave VRAM back and the GPU \
             has none to take back; it fails with ENOSPC (swap keeps the page in RAM)",
            n + 1
        );
    }
}

/// Reads failed because a page did not match its checksum, over every
/// queue of the process (one store per server).
static INTEGRITY_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Rounds a queue has, made when it opens.
const ROUNDS: usize = 8;

/// A lone write of at most this many pages writes their checksums as
/// stream writes (no copy engine); more go as one copy.
const WRITE_VALUE_PAGES: usize = 4;

/// Reads this process failed on a checksum mismatch.
pub(crate) fn integrity_errors() -> u64 {
    INTEGRITY_ERRORS.load(Relaxed)
}

/// Requests issued together and the event recorded after them. Every
/// round is made when the queue opens and reused, so the hot path neither
/// creates events nor allocates.
struct Round {
    event: sys::CUevent,
    completions: Vec<Completion>,
    descs: DescTable,
    /// For each descriptor that checks checksums: its index in `descs`,
    /// its request's index in `completions`, and its device offset.
    verifies: Vec<(usize, usize, u64)>,
    /// The checksums of the pages the copy engines move: computed on the
    /// CPU before a write's copy, fetched beside a read's data.
    sums: PinnedTable<u32>,
    /// The reads whose checksums the CPU checks once the round is done.
    cpu_checks: Vec<CpuCheck>,
    /// Extents the round's requests pinned, let go when it finishes.
    pins: Vec<u32>,
    /// When its event was recorded (the GPU stage starts there), while
    /// stages are timed (stages.rs).
    recorded_at: Option<Instant>,
}

impl Round {
    /// A round with its event; its room comes with `ready`.
    fn new() -> Result<Round, StoreError> {
        Ok(Round {
            event: checked(
                result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING),
                "cuEventCreate",
            )?,
            completions: Vec::new(),
            descs: DescTable::empty(),
            verifies: Vec::new(),
            sums: PinnedTable::empty(),
            cpu_checks: Vec::new(),
            pins: Vec::new(),
            recorded_at: None,
        })
    }

    /// Room for a round of `depth` requests of `max_io` bytes each: every
    /// request cut at one extent boundary at most, into the kernel's
    /// pieces, and a checksum per page.
    fn ready(&mut self, depth: usize, max_io: usize) -> Result<(), StoreError> {
        let descs = depth * (kernel::piece_count(max_io as u32) + 1);
        let pages = depth * max_io.div_ceil(PAGE as usize);
        self.descs.reserve_exact(descs)?;
        self.sums.reserve_exact(pages)?;
        self.completions.reserve_exact(depth);
        self.verifies.reserve_exact(descs);
        self.cpu_checks.reserve_exact(2 * depth);
        self.pins.reserve_exact(2 * depth);
        Ok(())
    }
}

/// A read on the copy engines whose pages the CPU checks when its round
/// finishes: their checksums sit in the round's `sums` from `at`.
#[derive(Clone, Copy)]
struct CpuCheck {
    at: usize,
    job: usize,
    buf: *const u8,
    len: u32,
    offset: u64,
}

/// One request's piece inside one extent, translated to VRAM.
#[derive(Clone, Copy)]
struct Piece {
    /// Index of its request in the round's `jobs`.
    job: usize,
    op: Op,
    /// Its extent and where in it the piece starts.
    extent: u32,
    within: u64,
    vram: u64,
    buf: *mut u8,
    len: u32,
    /// The buffer's device address when the piece can go through the
    /// kernel (found once, when the piece is cut).
    kernel_buf: Option<u64>,
}

/// A request of the round and how its pieces went.
#[derive(Clone, Copy)]
struct Job {
    tag: u16,
    len: u32,
    failed: bool,
    /// Some of its pieces are in the launch's table (copies or checksums).
    in_table: bool,
}

/// How a queue moves data, fixed when it opens.
#[derive(Clone, Copy)]
pub(crate) struct CopyPath {
    /// The loaded copy kernel; None: copy engines only.
    pub(crate) kernel: Option<sys::CUfunction>,
    pub(crate) policy: CopyPolicy,
    /// Pages carry checksums.
    pub(crate) integrity: bool,
    /// The driver has the stream write entry point (CUDA 12.0 or newer);
    /// without it a write's checksums go as a copy.
    pub(crate) stream_writes: bool,
}

pub struct CudaQueue {
    ctx: sys::CUcontext,
    base: sys::CUdeviceptr,
    extents: Arc<ExtentMap>,
    stream: sys::CUstream,
    /// Where reads on the copy engines fetch their checksums, beside the
    /// data copies on `stream`; `stream` waits for it through `sum_event`.
    sum_stream: sys::CUstream,
    sum_event: sys::CUevent,
    /// Where mappings are recorded, waited for at once (rarely: a write to
    /// an extent with no slot, a discard of a whole extent). Made after the
    /// context is current, hence the Option.
    map_stream: Option<SyncStream>,
    pinned: *mut std::ffi::c_void,
    /// The io buffers' address as the GPU sees them.
    pinned_dev: sys::CUdeviceptr,
    pinned_len: usize,
    path: CopyPath,
    rounds: VecDeque<Round>,
    spare: Vec<Round>,
    /// Scratch for a round's pieces and requests (kept for capacity).
    pieces: Vec<Piece>,
    jobs: Vec<Job>,
    /// Requests that found an extent moving, no room while the keeper
    /// takes VRAM back, or every round in flight: tried again at the next
    /// poll.
    deferred: Deferred,
    in_flight: usize,
    /// The GPU's name, for the log.
    gpu: Arc<str>,
}

impl CudaQueue {
    pub(crate) fn open(
        ctx: sys::CUcontext,
        base: sys::CUdeviceptr,
        extents: Arc<ExtentMap>,
        buffers: &BufferRegion,
        path: CopyPath,
        gpu: Arc<str>,
    ) -> Result<CudaQueue, StoreError> {
        let depth = buffers.count().max(1);
        let mut q = CudaQueue {
            ctx,
            base,
            extents,
            stream: std::ptr::null_mut(),
            sum_stream: std::ptr::null_mut(),
            sum_event: std::ptr::null_mut(),
            map_stream: None,
            pinned: std::ptr::null_mut(),
            pinned_dev: 0,
            pinned_len: buffers.len(),
            path,
            rounds: VecDeque::with_capacity(ROUNDS),
            spare: Vec::with_capacity(ROUNDS),
            pieces: Vec::with_capacity(2 * depth),
            jobs: Vec::with_capacity(depth),
            deferred: Deferred::with_capacity(2 * depth),
            in_flight: 0,
            gpu,
        };
        // The queue is used only on the thread that opens it (the queue's
        // own thread), so the context is made current once, here.
        // SAFETY: the context is retained by the store, which outlives us.
        checked(unsafe { result::ctx::set_current(ctx) }, "cuCtxSetCurrent")?;
        q.stream = new_stream("cuStreamCreate")?;
        q.sum_stream = new_stream("cuStreamCreate (checksums)")?;
        q.sum_event = checked(
            result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING),
            "cuEventCreate (checksums)",
        )?;
        // SAFETY: the region outlives this queue (the queue loop drops the
        // store handle before its buffers). Host registration is not in the
        // result layer.
        unsafe {
            check(
                sys::cuMemHostRegister_v2(
                    buffers.base().cast(),
                    buffers.len(),
                    sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP,
                ),
                "pinning the io buffers (cuMemHostRegister)",
            )?;
        }
        q.pinned = buffers.base().cast();
        q.map_stream = Some(SyncStream::new()?);
        if q.path.kernel.is_some() {
            // SAFETY: the range was registered with DEVICEMAP just above.
            let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut q.pinned_dev, q.pinned, 0) };
            if let Err(e) = check(r, "mapping the io buffers for the GPU") {
                log::warn!("{e}; this queue uses the copy engines only");
                q.path.kernel = None;
            }
        }
        for _ in 0..ROUNDS {
            let mut round = Round::new()?;
            let ready = round.ready(depth, buffers.slot_len());
            // Kept even when not ready: Drop frees what it has.
            q.spare.push(round);
            ready?;
        }
        q.warm()?;
        Ok(q)
    }

    /// Calls every driver entry point the hot path calls once (warm.rs
    /// says why), on scratch VRAM taken for it and given back.
    fn warm(&mut self) -> Result<(), StoreError> {
        // SAFETY: freed below, after the stream has passed every use.
        let scratch = checked(
            unsafe { result::malloc_sync(warm::SCRATCH) },
            "allocating scratch VRAM to open a queue",
        )?;
        let copy = match (self.path.kernel, self.spare.first_mut()) {
            (Some(f), Some(r)) => Some((f, &mut r.descs)),
            _ => None,
        };
        let r = warm::entry_points(self.stream, scratch, copy, self.path.stream_writes);
        // SAFETY: entry_points waited for the stream (or failed before
        // queuing anything further); nothing else uses the scratch.
        unsafe {
            let _ = result::stream::synchronize(self.stream);
            let _ = result::free_sync(scratch);
        }
        r
    }

    /// The device address of a piece's buffer, when the piece can go
    /// through the kernel.
    fn kernel_buffer(&self, p: &Piece) -> Option<u64> {
        self.path.kernel?;
        if !p.op.uses_buffer() || p.len > self.path.policy.kernel_max {
            return None;
        }
        let at = (p.buf as usize).checked_sub(self.pinned as usize)?;
        if at + p.len as usize > self.pinned_len {
            return None;
        }
        let buf = self.pinned_dev + at as u64;
        kernel::kernel_can_move(buf, p.vram, p.len).then_some(buf)
    }

    /// Issues piece `p` on the copy engines, and with integrity its pages'
    /// checksums at `sums`: a write's computed here from its buffer and
    /// written before the data (a few as stream writes, which cost less
    /// than a copy, more as one copy), a read's fetched on the checksum
    /// stream beside the data for [`CudaQueue::finish`] to check; zeroed
    /// pages get zero checksums. False when a call failed.
    fn copy_with_sums(&self, p: &Piece, sums: u64, round: &mut Round) -> bool {
        if !self.checksummed(p.op) {
            if !self.issue(p) {
                return false;
            }
            if p.op == Op::WriteZeroes && self.path.integrity {
                return self.zero_sums(sums, p.len);
            }
            return true;
        }
        let at = round.sums.len;
        let pages = (u64::from(p.len) / PAGE) as usize;
        for k in 0..pages {
            let sum = if p.op == Op::Write {
                // SAFETY: the write's own buffer, `len` bytes long.
                let page = unsafe {
                    std::slice::from_raw_parts(p.buf.add(k * PAGE as usize), PAGE as usize)
                };
                page_sum_cpu(page)
            } else {
                0
            };
            if !round.sums.push(sum) {
                log::error!("a round's checksum table is full; failing the request");
                return false;
            }
        }
        let (host, n) = (round.sums.host_at(at), pages * 4);
        if p.op == Op::Write {
            // Stream writes first where the driver has them; a refused one
            // leaves the copy below to write them all.
            let by_value = self.path.stream_writes
                && pages <= WRITE_VALUE_PAGES
                && (0..pages).all(|k| {
                    let value = round.sums.get(at + k).unwrap_or(0);
                    // SAFETY: page k's checksum, in the checksum slots (a
                    // stream write: not in the result layer).
                    retried_once("a checksum write", || unsafe {
                        sys::cuStreamWriteValue32_v2(self.stream, sums + 4 * k as u64, value, 0)
                            .result()
                    })
                    .is_ok()
                });
            // SAFETY: the checksums of pages of an extent the request
            // pinned, and `n` bytes of the round's pinned table, alive
            // until the round's event completes.
            let written = by_value
                || retried_once("a checksum copy", || unsafe {
                    result::memcpy_htod_async(
                        sums,
                        std::slice::from_raw_parts(host, pages),
                        self.stream,
                    )
                })
                .is_ok();
            if !written {
                log::error!("writing {pages} page checksum(s) failed");
                return false;
            }
            return self.issue(p);
        }
        if !self.issue(p) {
            return false;
        }
        // SAFETY: as for the write above; on the checksum stream, which the
        // round's stream waits for before its event.
        let r = retried_once("a checksum copy", || unsafe {
            result::memcpy_dtoh_async(
                std::slice::from_raw_parts_mut(host, pages),
                sums,
                self.sum_stream,
            )
        });
        if let Err(e) = r {
            log::error!("fetching {n} bytes of checksums: {}", describe(e));
            return false;
        }
        round.cpu_checks.push(CpuCheck {
            at,
            job: p.job,
            buf: p.buf,
            len: p.len,
            offset: self.device_offset(p),
        });
        true
    }

    /// Makes the round's stream wait for the checksums fetched on the
    /// checksum stream, so the round's event covers them; false when that
    /// could not be arranged and the fetches were waited for here instead,
    /// and failed.
    fn join_sum_stream(&self) -> bool {
        // SAFETY: our own event and streams.
        let joined = unsafe {
            result::event::record(self.sum_event, self.sum_stream).is_ok()
                && result::stream::wait_event(
                    self.stream,
                    self.sum_event,
                    sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
                .is_ok()
        };
        joined || self.wait_for(self.sum_stream, "fetching checksums")
    }

    /// Waits for everything queued on `stream` (one of ours); false, with
    /// the error logged, when it failed. check() ends the server on a lost
    /// context.
    fn wait_for(&self, stream: sys::CUstream, what: &str) -> bool {
        // SAFETY: waiting on a stream this queue created.
        match checked(unsafe { result::stream::synchronize(stream) }, what) {
            Ok(()) => true,
            Err(e) => {
                log::error!("{e}");
                false
            }
        }
    }

    /// Whether requests of `op` carry checksums through the table.
    fn checksummed(&self, op: Op) -> bool {
        self.path.integrity && matches!(op, Op::Read | Op::Write)
    }

    /// The device byte offset a piece starts at.
    fn device_offset(&self, p: &Piece) -> u64 {
        u64::from(p.extent) * EXTENT + p.within
    }

    /// Zeroes the checksums of `len` bytes of pages (zeroed data), queued
    /// on the stream; false when the call failed.
    fn zero_sums(&self, at: u64, len: u32) -> bool {
        let n = (u64::from(len) / PAGE * 4) as usize;
        // SAFETY: the checksums of pages of an extent the request pinned.
        let r = retried_once("zeroing checksums", || unsafe {
            result::memset_d8_async(at, 0, n, self.stream)
        });
        if let Err(e) = r {
            log::error!("zeroing {n} bytes of checksums: {}", describe(e));
        }
        r.is_ok()
    }

    /// Launches the kernel over the round's table; false when it failed.
    fn launch(&self, descs: &DescTable) -> bool {
        match self.path.kernel {
            Some(function) => launch_table(function, descs, self.stream),
            None => descs.len == 0,
        }
    }

    /// Issues one piece on the copy engines; false when the call failed.
    fn issue(&self, p: &Piece) -> bool {
        let len = p.len as usize;
        // SAFETY: the piece lies inside a mapped slot its request pinned,
        // and inside the request's pinned buffer, both alive until the
        // round's event completes.
        let res = retried_once("a copy", || unsafe {
            match p.op {
                Op::Write => result::memcpy_htod_async(
                    p.vram,
                    std::slice::from_raw_parts(p.buf, len),
                    self.stream,
                ),
                Op::Read => result::memcpy_dtoh_async(
                    std::slice::from_raw_parts_mut(p.buf, len),
                    p.vram,
                    self.stream,
                ),
                Op::WriteZeroes => result::memset_d8_async(p.vram, 0, len, self.stream),
                Op::Flush | Op::Discard => Ok(()),
            }
        });
        if let Err(e) = res {
            log::error!("{:?} of {} bytes: {}", p.op, p.len, describe(e));
        }
        res.is_ok()
    }

    /// Records extent `e`'s map entry as `entry` (slot + 1, or 0), after
    /// zeroing `zero` (a slot being freed) if given, and waits for both.
    fn record(&self, e: u32, entry: u32, zero: Option<u32>) -> bool {
        let Some(stream) = &self.map_stream else {
            return false;
        };
        // An unmapped extent's checksums are zero, as its data reads.
        let sums = (self.path.integrity && zero.is_some()).then(|| sum_addr(self.base, e, 0));
        record_extent(stream, self.base, e, entry, zero, sums)
    }

    /// Unmaps the extents a discard covers whole and nobody uses: each is
    /// held "moving" while its slot is zeroed and the unmapping recorded,
    /// then its slot is free. A discard may be ignored, so a busy extent
    /// simply keeps its data.
    fn discard(&self, r: &Request) {
        let first = r.offset.div_ceil(EXTENT);
        let end = (r.offset + u64::from(r.len)) / EXTENT;
        for e in first..end {
            let e = e as u32;
            let Some(slot) = self.extents.begin_move(e) else {
                continue;
            };
            if self.record(e, 0, Some(slot)) {
                self.extents.end_unmap(e);
            } else {
                self.extents.abort_move(e);
            }
        }
    }

    /// Whether a round whose event answered `r` (not "not ready") did its
    /// work. A lost context ends the server (`context_lost`); an event
    /// query refused by itself is settled by waiting for the stream.
    fn round_succeeded(&self, r: Result<(), DriverError>) -> bool {
        round_succeeded(r, self.stream, "a round of copies")
    }

    fn mismatch(&self, offset: u64, span: u32) {
        report_mismatch(&self.gpu, offset, span);
    }

    /// Answers a finished round's requests and lets go of what it held.
    fn finish(&mut self, mut round: Round, failed: bool, done: &mut Vec<Completion>) {
        for e in round.pins.drain(..) {
            self.extents.unpin(e);
        }
        let mut bad: Vec<(usize, u64, u32)> = Vec::new();
        for (i, job, offset) in round.verifies.drain(..) {
            let flags = round.descs.get(i).map_or(0, |d| d.flags);
            if !failed && flags & flags::MISMATCH != 0 {
                bad.push((job, offset, kernel::PIECE));
            }
        }
        for c in round.cpu_checks.drain(..) {
            if failed {
                continue;
            }
            for k in 0..(u64::from(c.len) / PAGE) as usize {
                // SAFETY: the read's own buffer, filled by its finished
                // copy; nothing else touches it until it is answered.
                let page = unsafe {
                    std::slice::from_raw_parts(c.buf.add(k * PAGE as usize), PAGE as usize)
                };
                if round.sums.get(c.at + k) != Some(page_sum_cpu(page)) {
                    bad.push((c.job, c.offset + k as u64 * PAGE, PAGE as u32));
                }
            }
        }
        for (job, offset, span) in bad {
            self.mismatch(offset, span);
            if let Some(c) = round.completions.get_mut(job) {
                c.result = -libc::EIO;
            }
        }
        done.extend(round.completions.drain(..).map(|c| Completion {
            tag: c.tag,
            result: if failed { -libc::EIO } else { c.result },
        }));
        self.spare.push(round);
    }

    /// Cuts request `r` (job `job`) into pieces per extent, pinning each.
    /// Reads of unmapped extents are answered with zeros here. Err: the
    /// request took nothing (pins undone) and why.
    fn translate(&mut self, r: &Request, job: usize, round: &mut Round) -> Result<(), PinRefused> {
        let pins_before = round.pins.len();
        let pieces_before = self.pieces.len();
        let mut at = r.offset;
        let end = r.offset + u64::from(r.len);
        while at < end {
            let e = (at / EXTENT) as u32;
            let within = at % EXTENT;
            let len = (EXTENT - within).min(end - at) as u32;
            // SAFETY (for the pointer offset below): `at - r.offset` is
            // within the request, whose length the engine checked against
            // its buffer.
            let buf = unsafe { r.buf.as_ptr().add((at - r.offset) as usize) };
            let pinned = {
                let q = &*self;
                q.extents
                    .pin_recorded(e, r.op == Op::Write, &mut |s| q.record(e, s + 1, None))
            };
            match pinned {
                Ok(pinned) => {
                    round.pins.push(e);
                    let slot = match pinned {
                        Pinned::Mapped(s) | Pinned::Allocated(s) => Some(s),
                        Pinned::Unmapped => None,
                    };
                    match slot {
                        Some(s) => {
                            let mut piece = Piece {
                                job,
                                op: r.op,
                                extent: e,
                                within,
                                vram: slot_addr(self.base, s) + within,
                                buf,
                                len,
                                kernel_buf: None,
                            };
                            piece.kernel_buf = self.kernel_buffer(&piece);
                            self.pieces.push(piece);
                        }
                        None if r.op == Op::Read => {
                            // SAFETY: the piece's part of the request's
                            // buffer, which only this request touches.
                            unsafe { std::ptr::write_bytes(buf, 0, len as usize) }
                        }
                        // Zeroing an unmapped extent: it reads as zeros.
                        None => {}
                    }
                }
                Err(why) => {
                    for e in round.pins.drain(pins_before..) {
                        self.extents.unpin(e);
                    }
                    self.pieces.truncate(pieces_before);
                    return Err(why);
                }
            }
            at += u64::from(len);
        }
        Ok(())
    }
}

impl QueueStore for CudaQueue {
    fn submit(&mut self, batch: &mut Vec<Request>, done: &mut Vec<Completion>) {
        let Some(mut round) = self.spare.pop() else {
            // Every round is in flight: the batch waits for one.
            self.deferred.append(batch);
            return;
        };
        let mut clock = stages::start();
        self.pieces.clear();
        self.jobs.clear();
        // Lookups first: a write that takes a slot has its mapping
        // recorded (and waited for) before any copy of the round is queued.
        for r in batch.drain(..) {
            let job = self.jobs.len();
            self.jobs.push(Job {
                tag: r.tag,
                len: r.len,
                failed: false,
                in_table: false,
            });
            match r.op {
                Op::Flush => continue,
                Op::Discard => {
                    self.discard(&r);
                    continue;
                }
                _ => {}
            }
            match self.translate(&r, job, &mut round) {
                Ok(()) => {}
                Err(PinRefused::Moving) => {
                    self.jobs.pop();
                    self.deferred.push(r);
                }
                Err(PinRefused::NoRoom) if self.extents.want_room() => {
                    self.jobs.pop();
                    self.deferred.push(r);
                }
                Err(PinRefused::NotRecorded) => {
                    self.jobs.pop();
                    done.push(Completion {
                        tag: r.tag,
                        result: -libc::EIO,
                    });
                }
                Err(PinRefused::NoRoom) => {
                    self.jobs.pop();
                    report_no_room();
                    done.push(Completion {
                        tag: r.tag,
                        result: -libc::ENOSPC,
                    });
                }
            }
        }
        clock = stages::lap(Stage::Translate, clock);
        if self.jobs.is_empty() {
            // Every request waits (deferred) or has its answer: no event
            // to record while the queue retries at each poll.
            self.spare.push(round);
            return;
        }
        // Small pieces into the kernel's table (their checksums computed
        // by the kernel), the rest straight onto the copy engines (their
        // checksums on the CPU: a launch after a lone copy would double
        // its latency); the launch goes after them on the stream.
        let mut pieces = std::mem::take(&mut self.pieces);
        let eligible = pieces.iter().filter(|p| p.kernel_buf.is_some()).count();
        let kernel_copies = eligible >= self.path.policy.kernel_min_batch;
        let via_kernel = |p: &Piece| kernel_copies && p.kernel_buf.is_some();
        let (mut table_len, mut sums_len) = (0usize, 0usize);
        for p in pieces.iter() {
            if via_kernel(p) {
                table_len += kernel::piece_count(p.len);
            } else if self.checksummed(p.op) {
                sums_len += (u64::from(p.len) / PAGE) as usize;
            }
        }
        let table = match round.descs.reserve(table_len) {
            Ok(()) => true,
            Err(e) => {
                log::error!("{e}; this round's copies use the copy engines");
                false
            }
        };
        let staging = match round.sums.reserve(sums_len) {
            Ok(()) => true,
            Err(e) => {
                log::error!("{e}; this round's checksummed copies fail");
                false
            }
        };
        round.verifies.clear();
        round.cpu_checks.clear();
        for p in pieces.drain(..) {
            let whole_pages =
                u64::from(p.len).is_multiple_of(PAGE) && p.within.is_multiple_of(PAGE);
            let kernel_buf = p.kernel_buf.filter(|_| table && via_kernel(&p));
            if self.checksummed(p.op) && (!whole_pages || !(kernel_buf.is_some() || staging)) {
                // The device's blocks are whole pages, so this is a bug or
                // a table that could not be had: fail rather than leave a
                // page without its checksum.
                log::error!(
                    "integrity: a {:?} of {} bytes at {} within an extent cannot be checksummed; it fails",
                    p.op,
                    p.len,
                    p.within
                );
                self.jobs[p.job].failed = true;
                continue;
            }
            let sums = sum_addr(self.base, p.extent, p.within);
            let Some(buf) = kernel_buf else {
                if !self.copy_with_sums(&p, sums, &mut round) {
                    self.jobs[p.job].failed = true;
                }
                continue;
            };
            let (src, dst) = match p.op {
                Op::Write => (buf, p.vram),
                _ => (p.vram, buf),
            };
            let check = match p.op {
                Op::Write if self.path.integrity => flags::STORE_SUM,
                Op::Read if self.path.integrity => flags::VERIFY_SUM,
                _ => 0,
            };
            let whole = Desc {
                src,
                dst,
                sums,
                len: p.len,
                flags: flags::COPY | check,
            };
            self.jobs[p.job].in_table = true;
            let offset = self.device_offset(&p);
            for (k, d) in kernel::pieces(whole).enumerate() {
                let at = round.descs.len;
                if !round.descs.push(d) {
                    // Sized for every piece above, so this is a bug; the
                    // request fails rather than lose a piece.
                    log::error!("the copy kernel's descriptor table is full; failing the request");
                    self.jobs[p.job].failed = true;
                    break;
                }
                if d.flags & flags::VERIFY_SUM != 0 {
                    let piece_at = offset + (k as u64) * u64::from(kernel::PIECE);
                    round.verifies.push((at, p.job, piece_at));
                }
            }
        }
        self.pieces = pieces;
        if !round.cpu_checks.is_empty() && !self.join_sum_stream() {
            for c in &round.cpu_checks {
                self.jobs[c.job].failed = true;
            }
        }
        clock = stages::lap(Stage::Build, clock);
        let launched = self.launch(&round.descs);
        round
            .completions
            .extend(self.jobs.iter().map(|j| Completion {
                tag: j.tag,
                result: if j.failed || (j.in_table && !launched) {
                    -libc::EIO
                } else {
                    j.len as i32
                },
            }));
        // SAFETY: event and stream are ours.
        let recorded = unsafe { result::event::record(round.event, self.stream) };
        match checked(recorded, "cuEventRecord") {
            Ok(()) => {
                round.recorded_at = stages::lap(Stage::Launch, clock);
                stages::count_round(round.completions.len());
                self.in_flight += round.completions.len();
                self.rounds.push_back(round);
            }
            Err(e) => {
                log::error!("{e}");
                // SAFETY: waiting on our own stream.
                let ok = unsafe { result::stream::synchronize(self.stream) }.is_ok();
                self.finish(round, !ok, done);
            }
        }
    }

    fn poll(&mut self, done: &mut Vec<Completion>) {
        while let Some(round) = self.rounds.front() {
            // SAFETY: querying our own event.
            let r = unsafe { result::event::query(round.event) };
            if r == Err(DriverError(sys::CUresult::CUDA_ERROR_NOT_READY)) {
                break;
            }
            let Some(round) = self.rounds.pop_front() else {
                break;
            };
            let finishing = stages::lap(Stage::Gpu, round.recorded_at);
            self.in_flight -= round.completions.len();
            let failed = !self.round_succeeded(r);
            self.finish(round, failed, done);
            stages::lap(Stage::Finish, finishing);
        }
        if !self.deferred.is_empty() {
            let mut again = self.deferred.take();
            self.submit(&mut again, done);
            self.deferred.retried(again);
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.deferred.len()
    }
}

impl Drop for CudaQueue {
    fn drop(&mut self) {
        // SAFETY: tearing down what open() made, after the stream drains.
        unsafe {
            let _ = result::ctx::set_current(self.ctx);
            if !self.stream.is_null() {
                let _ = result::stream::synchronize(self.stream);
            }
            for r in &self.rounds {
                for &e in &r.pins {
                    self.extents.unpin(e);
                }
            }
            for mut r in self.rounds.drain(..).chain(self.spare.drain(..)) {
                let _ = result::event::destroy(r.event);
                r.descs.free();
                r.sums.free();
            }
            if !self.pinned.is_null() {
                sys::cuMemHostUnregister(self.pinned);
            }
            if !self.stream.is_null() {
                let _ = result::stream::destroy(self.stream);
            }
            if !self.sum_stream.is_null() {
                let _ = result::stream::synchronize(self.sum_stream);
                let _ = result::stream::destroy(self.sum_stream);
            }
            if !self.sum_event.is_null() {
                let _ = result::event::destroy(self.sum_event);
            }
        }
    }
}
