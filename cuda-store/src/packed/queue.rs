//! One queue of a compressed device: its own streams (one per staging,
//! two for reads, one for the rest), its io buffers pinned and
//! device-mapped once, its rounds found done by polling an event, as a
//! plain queue's.
//!
//! A round of writes takes two trips to the GPU: one launch compresses
//! every page into staging VRAM (and finds the same-filled ones); once it
//! is done the queue reads what each page became, takes a slot of its
//! class, and one launch copies the blocks into their slots, a second
//! (after it on the stream) writes their page map entries. Only then is
//! the write answered and the page's old slot freed (state.rs), so a crash
//! at any point leaves every page named by an entry whose block is whole.
//! A round of reads looks its pages up, fills same-filled and unwritten
//! pages on the CPU and decompresses the rest on the GPU straight into the
//! io buffers. A discard or write-zeroes writes empty entries.
//!
//! Small rounds stay off the page kernels, which walk a page's sequences
//! one after another and so take 60-110 us whatever the round's size
//! (docs/benchmarks.md): a round of at most [`CPU_PAGES`] pages is
//! compressed on the CPU (by lz4_flex's search, a third of the reference
//! encoder's time; LZ4 blocks either way) and its blocks copied from pinned
//! memory, and a read of at most
//! that many stored pages has their blocks copied out and decoded on the
//! CPU.
//! Rounds of one queue are answered as they finish; a flush waits for
//! every round before it. This file holds the queue and its rounds' life;
//! queue/writes.rs the write and discard rounds, queue/reads.rs the reads.
//!
//! Nothing here allocates once the queue is open: its [`ROUNDS`] rounds,
//! their pinned tables and every list the hot path fills are made with
//! room for the most they can hold, and a request that finds no round free
//! waits (deferred) for one. A swap device's server is asked for pages
//! while memory is short; an allocation then waits for memory that only
//! its own device can free (docs/design.md, "No allocation while serving").

use super::entry::{Entry, Loc, RAW_CLASS};
use super::state::Slots;
use super::{page_map_addr, Compress, Packed};
use crate::deferred::Deferred;
use crate::driver::{check, checked, describe, retried_once};
use crate::driver::{new_stream, SyncStream};
use crate::extents::{slot_addr, ExtentMap, PinRefused, Pinned};
use crate::integrity::page_sum_cpu;
use crate::kernel::{self, flags, Desc};
use crate::page_kernels::{kind, PageJob, PageLaunch};
use crate::pinned::{DescTable, PinnedTable};
use crate::queue::{
    copy_by_engine, launch_table, record_extent, report_mismatch, report_no_room, round_succeeded,
};
use crate::stages::{self, Stage as Timed};
use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vramblk_compress::{class_of, encode_page_quick, fill, lz, same_filled, Stored, PAGE};
use vramblk_store::{BufferRegion, Completion, Op, QueueStore, Request, StoreError};

mod reads;
mod writes;

/// Rounds of at most this many pages are compressed, or have their
/// blocks decoded, on the CPU (about 20 us a page to compress, 5 to
/// decode, on one core: less than a page kernel's launch to finish).
const CPU_PAGES: usize = 2;

/// Pieces (blocks and entries) a write round copies by the copy engine, one
/// call each, rather than by two launches of the copy kernel: a lone page's
/// write took 15.2 us (p50, corpus pages, H200) this way against 21.8-23.7
/// us with the launches (docs/benchmarks.md).
const ENGINE_PIECES: usize = 2 * CPU_PAGES;

/// Pages one compress launch takes: one of a queue's stagings in VRAM
/// (2 MiB). A compressed device leaves at least [`super::STAGING_ROOM`]
/// of VRAM free for its queues' first stagings.
pub(crate) const STAGING_PAGES: usize = 512;

/// Stagings a queue has: while the CPU places one round's blocks, the
/// next round compresses into the other. The second is made only where
/// the free VRAM has room for it.
pub(crate) const STAGINGS: usize = 2;

/// Streams a queue decompresses reads on, in turn: two rounds of reads
/// decompress at once.
const READ_STREAMS: usize = 2;

/// Rounds a queue has: made when it opens; requests that find all of them
/// in flight wait for one to finish.
const ROUNDS: usize = 16;

/// The most pages one round takes (a write round: its staging). A read of
/// more is cut into several rounds; no request is larger (the device's
/// largest I/O is 512 KiB).
const ROUND_PAGES: usize = STAGING_PAGES;

/// Pool extents emptied by one finished round that are unmapped without
/// growing the list that holds them.
const EMPTIED_ROOM: usize = 64;

/// How long a request waits for a pool extent that give-back is moving.
const MOVE_WAIT: Duration = Duration::from_secs(2);

/// Where a round is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Writes: the compress launch is running.
    Compressing,
    /// Writes: blocks and entries are being stored.
    Storing,
    /// Discards, write-zeroes: their pages' entries are being zeroed (the
    /// host copy of the map follows when that is done).
    Emptying,
    /// Reads: the decompress launch is running.
    Reading,
    /// A flush: answered once every round before it is.
    Barrier,
}

/// A request's result while it waits to be submitted again (a page of it
/// was pending, see state.rs).
const DEFERRED: i32 = i32::MIN;

/// A request of a round.
#[derive(Clone, Copy)]
struct Req {
    /// As the engine gave it (what is submitted again when deferred).
    orig: Request,
    /// Its pages are marked pending by this round.
    marked: bool,
    tag: u16,
    /// Its first page and how many.
    page: u64,
    pages: u32,
    buf: *mut u8,
    /// The buffer's device address.
    dev: u64,
    /// Its first page's job (writes, reads).
    job: usize,
    /// Bytes done, or a negative errno.
    result: i32,
}

struct Round {
    event: sys::CUevent,
    /// The stream its work is queued on (`PackedQueue::stream` says
    /// which).
    stream: sys::CUstream,
    stage: Stage,
    reqs: Vec<Req>,
    /// Page jobs; for a read, each job's request, its page in that
    /// request, and the checksum that page must have.
    jobs: PinnedTable<PageJob>,
    job_reqs: Vec<(usize, u32, u32)>,
    /// Copies of blocks into slots, then of entries into the page map.
    blocks: DescTable,
    entry_copies: DescTable,
    entries: PinnedTable<[u64; 2]>,
    /// The queue's staging the round compresses into, until its blocks'
    /// copies out of it are queued.
    staging: Option<usize>,
    /// Where a write round's blocks are copied from (the staging VRAM, or
    /// `host_blocks` when the CPU compressed them).
    blocks_from: u64,
    /// Pinned pages for blocks the CPU compressed, or fetched to decode.
    host_blocks: PinnedTable<[u8; PAGE]>,
    /// Reads decoded on the CPU: job, request, page in it, block.
    cpu_decodes: Vec<(usize, usize, u32, usize)>,
    /// Pool extents pinned by the round, let go when it ends.
    pins: Vec<u32>,
    /// The last of them and its VRAM slot: a round's pages crowd into
    /// few extents (slots are taken from the lowest with room), and each
    /// pin is an atomic every queue writing that class contends for.
    last_pin: Option<(u32, u32)>,
    /// Slots whose pages the round rewrote, freed when it ends.
    freed: Vec<Loc>,
    /// A read round: its pages' entries, as looked up. A write round: the
    /// slot each page job takes (None: a same-filled page, or none
    /// taken).
    looked: Vec<Entry>,
    slots: Vec<Option<Loc>>,
    /// A read round: the epoch its lookups belong to.
    epoch: Option<u64>,
    /// When its current stage began (only while stages are timed:
    /// stages.rs).
    clock: Option<Instant>,
}

impl Round {
    /// A round with its event; its tables come with `ready`.
    fn new() -> Result<Round, StoreError> {
        Ok(Round {
            event: checked(
                result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING),
                "cuEventCreate",
            )?,
            stream: std::ptr::null_mut(),
            stage: Stage::Barrier,
            reqs: Vec::new(),
            jobs: PinnedTable::empty(),
            job_reqs: Vec::new(),
            blocks: DescTable::empty(),
            entry_copies: DescTable::empty(),
            entries: PinnedTable::empty(),
            staging: None,
            blocks_from: 0,
            host_blocks: PinnedTable::empty(),
            cpu_decodes: Vec::new(),
            pins: Vec::new(),
            last_pin: None,
            freed: Vec::new(),
            looked: Vec::new(),
            slots: Vec::new(),
            epoch: None,
            clock: None,
        })
    }

    /// Gives the round room for the most it can hold: [`ROUND_PAGES`]
    /// pages of `depth` requests (each request's entries are one copy).
    fn ready(&mut self, depth: usize) -> Result<(), StoreError> {
        self.jobs.reserve_exact(ROUND_PAGES)?;
        self.blocks.reserve_exact(ROUND_PAGES)?;
        self.entries.reserve_exact(ROUND_PAGES)?;
        self.entry_copies.reserve_exact(ROUND_PAGES + 1)?;
        self.host_blocks.reserve_exact(CPU_PAGES)?;
        self.reqs.reserve_exact(depth.max(ROUND_PAGES));
        self.job_reqs.reserve_exact(ROUND_PAGES);
        self.cpu_decodes.reserve_exact(CPU_PAGES);
        self.pins.reserve_exact(ROUND_PAGES);
        self.freed.reserve_exact(ROUND_PAGES);
        self.looked.reserve_exact(ROUND_PAGES);
        self.slots.reserve_exact(ROUND_PAGES);
        Ok(())
    }

    /// Frees its event and tables.
    fn free(mut self) {
        // SAFETY: the round is finished (or never ran): nothing uses them.
        let _ = unsafe { result::event::destroy(self.event) };
        self.jobs.free();
        self.blocks.free();
        self.entry_copies.free();
        self.entries.free();
        self.host_blocks.free();
    }
}

pub struct PackedQueue {
    qid: usize,
    ctx: sys::CUcontext,
    base: sys::CUdeviceptr,
    extents: Arc<ExtentMap>,
    packed: Arc<Packed>,
    /// Where a round's work queues. A write round compressed on the GPU
    /// uses its staging's stream (`write_streams`): its copies out of the
    /// staging queue behind its own compress only, not another round's,
    /// and the staging's next compress queues after them. Reads the GPU
    /// decompresses take the `read_streams` in turn; the rest (discards,
    /// rounds done on the CPU) the queue's own `stream`. One stream for
    /// all of it made every round wait for the compress queued before it
    /// (docs/benchmarks.md, "Where a compressed round's time goes").
    stream: sys::CUstream,
    write_streams: [sys::CUstream; STAGINGS],
    read_streams: [sys::CUstream; READ_STREAMS],
    /// The read stream the next read round takes.
    next_read: usize,
    map_stream: Option<SyncStream>,
    pinned: *mut std::ffi::c_void,
    pinned_dev: sys::CUdeviceptr,
    pinned_len: usize,
    copy: sys::CUfunction,
    pages: PageLaunch,
    rounds: VecDeque<Round>,
    spare: Vec<Round>,
    /// VRAM the compress launches write into: [`STAGING_PAGES`] pages
    /// each, a round in each at a time. A staging is free again once the
    /// copies of its round's blocks out of it are queued: a later compress
    /// into it queues after them on the same stream.
    stagings: [u64; STAGINGS],
    staging_busy: [bool; STAGINGS],
    /// Requests that found a page pending or no round free: submitted
    /// again at the next poll that finds a round done (or none in flight).
    deferred: Deferred,
    /// A submit's requests by kind (kept for their room).
    reads: Vec<Req>,
    writes: Vec<Req>,
    empties: Vec<Req>,
    flushes: Vec<Request>,
    /// Pool extents a finished round emptied.
    emptied: Vec<u32>,
    in_flight: usize,
    gpu: Arc<str>,
}

/// What a compressed queue is given by its store.
pub(crate) struct PackedPath {
    pub(crate) copy: sys::CUfunction,
    pub(crate) pages: PageLaunch,
    pub(crate) packed: Arc<Packed>,
}

impl PackedQueue {
    pub(crate) fn open(
        qid: u16,
        ctx: sys::CUcontext,
        base: sys::CUdeviceptr,
        extents: Arc<ExtentMap>,
        buffers: &BufferRegion,
        path: PackedPath,
        gpu: Arc<str>,
    ) -> Result<PackedQueue, StoreError> {
        let depth = buffers.count().max(1);
        let mut q = PackedQueue {
            qid: qid.into(),
            ctx,
            base,
            extents,
            packed: path.packed,
            stream: std::ptr::null_mut(),
            write_streams: [std::ptr::null_mut(); STAGINGS],
            read_streams: [std::ptr::null_mut(); READ_STREAMS],
            next_read: 0,
            map_stream: None,
            pinned: std::ptr::null_mut(),
            pinned_dev: 0,
            pinned_len: buffers.len(),
            copy: path.copy,
            pages: path.pages,
            rounds: VecDeque::with_capacity(ROUNDS),
            spare: Vec::with_capacity(ROUNDS),
            stagings: [0; STAGINGS],
            staging_busy: [false; STAGINGS],
            deferred: Deferred::with_capacity(2 * depth),
            reads: Vec::with_capacity(depth),
            writes: Vec::with_capacity(depth),
            empties: Vec::with_capacity(depth),
            flushes: Vec::with_capacity(depth),
            emptied: Vec::with_capacity(EMPTIED_ROOM),
            in_flight: 0,
            gpu,
        };
        q.packed.state.slots().set_reader(q.qid, None);
        // SAFETY: the context is retained by the store, which outlives us;
        // the queue is used only on the thread that opens it.
        checked(unsafe { result::ctx::set_current(ctx) }, "cuCtxSetCurrent")?;
        let streams = std::iter::once(&mut q.stream)
            .chain(&mut q.write_streams)
            .chain(&mut q.read_streams);
        for s in streams {
            *s = new_stream("cuStreamCreate")?;
        }
        q.map_stream = Some(SyncStream::new()?);
        // The first staging is needed; the others only speed writes up,
        // and a queue goes without one the free VRAM has no room for
        // (STAGING_ROOM counts one per queue: a device must not be refused
        // for a speed-up).
        // SAFETY: freed in Drop.
        q.stagings[0] = checked(
            unsafe { result::malloc_sync(STAGING_PAGES * PAGE) },
            "allocating the queue's staging VRAM for compression (out of the VRAM left free)",
        )?;
        for i in 1..STAGINGS {
            // SAFETY: freed in Drop.
            match unsafe { result::malloc_sync(STAGING_PAGES * PAGE) } {
                Ok(at) => q.stagings[i] = at,
                // Never free, so never taken.
                Err(_) => q.staging_busy[i] = true,
            }
        }
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
        // SAFETY: the range was registered with DEVICEMAP just above.
        check(
            unsafe { sys::cuMemHostGetDevicePointer_v2(&mut q.pinned_dev, q.pinned, 0) },
            "mapping the io buffers for the GPU (a compressed device needs it)",
        )?;
        for _ in 0..ROUNDS {
            let mut round = Round::new()?;
            let ready = round.ready(depth);
            // Kept even when not ready: Drop frees what it has.
            q.spare.push(round);
            ready?;
        }
        // Every driver entry point the hot path calls, called once now
        // (warm.rs), on the staging, which no round uses yet.
        let copy = q.spare.first_mut().map(|r| (path.copy, &mut r.blocks));
        crate::warm::entry_points(q.stream, q.stagings[0], copy, false)?;
        Ok(q)
    }

    /// A free round made ready for `stage`; None when every round is in
    /// flight (the caller defers its requests).
    fn take_round(&mut self, stage: Stage) -> Option<Round> {
        let mut r = self.spare.pop()?;
        r.stage = stage;
        r.stream = self.stream;
        r.reqs.clear();
        r.job_reqs.clear();
        r.cpu_decodes.clear();
        r.host_blocks.len = 0;
        r.staging = None;
        r.pins.clear();
        r.last_pin = None;
        r.freed.clear();
        r.looked.clear();
        r.slots.clear();
        r.epoch = None;
        r.clock = None;
        r.jobs.len = 0;
        r.blocks.len = 0;
        r.entry_copies.len = 0;
        r.entries.len = 0;
        Some(r)
    }

    /// Defers every request of `reqs` (they are submitted again later).
    fn defer(&mut self, reqs: &mut Vec<Req>) {
        self.deferred.extend(reqs.drain(..).map(|r| r.orig));
    }

    /// The request as the round keeps it; None when it is not whole pages
    /// or (a read or write) its buffer is not in the pinned region or
    /// larger than a round (the device's blocks are 4 KiB, its largest
    /// I/O 512 KiB, and the engine hands the region's buffers, so none of
    /// that happens).
    fn req(&self, r: &Request) -> Option<Req> {
        let at = (r.buf.as_ptr() as usize).checked_sub(self.pinned as usize)?;
        let whole = (r.offset | u64::from(r.len)).is_multiple_of(PAGE as u64);
        let inside = !r.op.uses_buffer()
            || (at + r.len as usize <= self.pinned_len && r.len as usize <= ROUND_PAGES * PAGE);
        (whole && inside).then(|| Req {
            orig: *r,
            marked: false,
            tag: r.tag,
            page: r.offset / PAGE as u64,
            pages: r.len / PAGE as u32,
            buf: r.buf.as_ptr(),
            dev: self.pinned_dev + at as u64,
            job: 0,
            result: r.len as i32,
        })
    }

    /// Pins pool extent `e` (mapping it to a fresh slot first when `write`
    /// and it has none), waiting while give-back moves it; its slot.
    fn pin(&self, e: u32, write: bool) -> Result<u32, PinRefused> {
        let deadline = Instant::now() + MOVE_WAIT;
        loop {
            let got = self.extents.pin_recorded(e, write, &mut |s| {
                self.map_stream
                    .as_ref()
                    .is_some_and(|m| record_extent(m, self.base, e, s + 1, None, None))
            });
            match got {
                Ok(Pinned::Mapped(s)) => return Ok(s),
                Ok(Pinned::Allocated(s)) => {
                    self.packed
                        .note_room(self.extents.free_slots(), self.extents.capacity());
                    return Ok(s);
                }
                Ok(Pinned::Unmapped) => {
                    // A block in an unmapped extent: the map is wrong.
                    self.extents.unpin(e);
                    log::error!("pool extent {e} holds a page's block but has no VRAM");
                    return Err(PinRefused::NotRecorded);
                }
                Err(PinRefused::Moving) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(why) => return Err(why),
            }
        }
    }

    /// Pins pool extent `e` for `round` (once: its later pages in the same
    /// extent use the pin it holds, let go when it ends); its slot.
    fn pin_for(&self, round: &mut Round, e: u32, write: bool) -> Result<u32, PinRefused> {
        if let Some((pinned, slot)) = round.last_pin {
            if pinned == e {
                return Ok(slot);
            }
        }
        let slot = self.pin(e, write)?;
        round.pins.push(e);
        round.last_pin = Some((e, slot));
        Ok(slot)
    }

    /// Keeps in `reqs` those none of whose pages is pending; defers the
    /// others.
    fn defer_pending(&mut self, reqs: &mut Vec<Req>) {
        let st = &self.packed.state;
        let deferred = &mut self.deferred;
        reqs.retain(|r| {
            let wait = st.pending_any(r.page, r.pages);
            if wait {
                deferred.push(r.orig);
            }
            !wait
        });
    }

    /// Launches the copy kernel over `descs` on `stream`; false when that
    /// failed.
    fn launch_copies(&self, descs: &DescTable, stream: sys::CUstream) -> bool {
        launch_table(self.copy, descs, stream)
    }

    /// The stream the next read round decompresses on.
    fn read_stream(&mut self) -> sys::CUstream {
        let s = self.read_streams[self.next_read % READ_STREAMS];
        self.next_read = self.next_read.wrapping_add(1);
        s
    }

    /// Keeps a started round in flight, its event recorded after what it
    /// queued (a flush's barrier has none).
    fn record(&mut self, mut round: Round, done: &mut Vec<Completion>) {
        // A request deferred while the round was built is not in flight.
        let started = round.reqs.iter().filter(|r| r.result != DEFERRED).count();
        self.in_flight += started;
        if round.stage != Stage::Barrier {
            stages::count_round(started);
        }
        if round.stage != Stage::Storing {
            // A round stored at once (on the CPU, or failed) timed its
            // lookup and placing already.
            round.clock = stages::lap(Timed::Lookup, round.clock);
        }
        if round.stage == Stage::Barrier || self.record_event(&round) {
            self.rounds.push_back(round);
        } else {
            // SAFETY: waiting on our own stream.
            let ok = unsafe { result::stream::synchronize(round.stream) }.is_ok();
            self.finish(round, !ok, done);
        }
    }

    /// Records the round's event after what its stream holds now.
    fn record_event(&self, round: &Round) -> bool {
        // SAFETY: event and stream are ours.
        let recorded = unsafe { result::event::record(round.event, round.stream) };
        match checked(recorded, "cuEventRecord") {
            Ok(()) => true,
            Err(e) => {
                log::error!("{e}");
                false
            }
        }
    }

    /// Answers a finished round and lets go of what it held.
    fn finish(&mut self, mut round: Round, failed: bool, done: &mut Vec<Completion>) {
        let clock = stages::lap(Timed::Gpu, round.clock.take());
        if round.stage == Stage::Reading && !failed {
            self.settle_reads(&mut round);
        }
        for &e in &round.pins {
            self.extents.unpin(e);
        }
        let packed = Arc::clone(&self.packed);
        let st = &packed.state;
        if round.epoch.is_some() {
            let next = self.rounds.iter().find_map(|r| r.epoch);
            st.slots().set_reader(self.qid, next);
        }
        if round.stage == Stage::Emptying && !failed {
            // Their entries are zero in VRAM now: so in the host's copy,
            // and their old slots are freed (a round's worth at a time:
            // the list has room for that many).
            for r in round.reqs.iter().filter(|r| r.marked && r.result >= 0) {
                for p in r.page..r.page + u64::from(r.pages) {
                    let Some(old) = st.set(p, Entry::Empty).loc() else {
                        continue;
                    };
                    if round.freed.len() == round.freed.capacity() {
                        st.slots().retire(round.freed.drain(..), &mut self.emptied);
                    }
                    round.freed.push(old);
                }
            }
        }
        for r in round.reqs.iter().filter(|r| r.marked) {
            st.unmark(r.page, r.pages);
        }
        // A round that failed before its copies were queued.
        if let Some(i) = round.staging.take() {
            self.staging_busy[i] = false;
        }
        let mut sl = st.slots();
        sl.retire(round.freed.drain(..), &mut self.emptied);
        self.unmap_emptied(&mut sl);
        drop(sl);
        let answered = round.reqs.iter().filter(|r| r.result != DEFERRED);
        self.in_flight -= answered.clone().count();
        done.extend(answered.map(|r| Completion {
            tag: r.tag,
            result: if failed { -libc::EIO } else { r.result },
        }));
        stages::lap(Timed::Finish, clock);
        self.spare.push(round);
    }

    /// The pool extents freed slots emptied give their VRAM back (`sl`:
    /// the pool, its lock held).
    fn unmap_emptied(&mut self, sl: &mut Slots) {
        let mut emptied = std::mem::take(&mut self.emptied);
        for e in emptied.drain(..) {
            // Under the pool's lock: no slot of it is taken meanwhile.
            if !sl.pool.is_idle(e) {
                continue;
            }
            // An empty pool extent gives its VRAM slot back (zeroed, the
            // unmapping recorded); one still pinned keeps it for now.
            if let (Some(slot), Some(m)) = (self.extents.begin_move(e), &self.map_stream) {
                if record_extent(m, self.base, e, 0, Some(slot), None) {
                    self.extents.end_unmap(e);
                } else {
                    self.extents.abort_move(e);
                }
            }
        }
        self.emptied = emptied;
    }

    /// Whether a round on `stream` whose event answered `r` did its work.
    fn round_succeeded(&self, r: Result<(), DriverError>, stream: sys::CUstream) -> bool {
        round_succeeded(r, stream, "a round of compressed pages")
    }
}

impl QueueStore for PackedQueue {
    fn submit(&mut self, batch: &mut Vec<Request>, done: &mut Vec<Completion>) {
        let mut reads = std::mem::take(&mut self.reads);
        let mut writes = std::mem::take(&mut self.writes);
        let mut empties = std::mem::take(&mut self.empties);
        let mut flushes = std::mem::take(&mut self.flushes);
        for r in batch.drain(..) {
            if r.op == Op::Flush {
                flushes.push(r);
                continue;
            }
            let Some(req) = self.req(&r) else {
                log::error!(
                    "a {:?} of {} bytes at {} is not whole pages inside the io buffers (at most {} KiB)",
                    r.op,
                    r.len,
                    r.offset,
                    (ROUND_PAGES * PAGE) >> 10
                );
                done.push(Completion {
                    tag: r.tag,
                    result: -libc::EINVAL,
                });
                continue;
            };
            match r.op {
                Op::Read => reads.push(req),
                Op::Write => writes.push(req),
                _ => empties.push(req),
            }
        }
        if !writes.is_empty() {
            self.start_writes(&mut writes, done);
        }
        if !empties.is_empty() {
            self.start_empties(&mut empties, done);
        }
        if !reads.is_empty() {
            self.start_reads(&mut reads, done);
        }
        self.start_flushes(&mut flushes, done);
        (self.reads, self.writes, self.empties) = (reads, writes, empties);
        self.flushes = flushes;
    }

    fn poll(&mut self, done: &mut Vec<Completion>) {
        let answered = done.len();
        self.poll_rounds(done);
        if !self.deferred.is_empty() && (done.len() > answered || self.rounds.is_empty()) {
            let mut again = self.deferred.take();
            self.submit(&mut again, done);
            self.deferred.retried(again);
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.deferred.len()
    }
}

impl PackedQueue {
    /// Answers `flushes` once every round before them is: at once when
    /// none is in flight, else by a barrier round behind them.
    fn start_flushes(&mut self, flushes: &mut Vec<Request>, done: &mut Vec<Completion>) {
        if flushes.is_empty() {
            return;
        }
        if !self.deferred.is_empty() {
            // Writes submitted before it wait to be submitted again: so
            // does the flush, behind them.
            self.deferred.append(flushes);
            return;
        }
        if self.rounds.is_empty() {
            done.extend(flushes.drain(..).map(|r| Completion {
                tag: r.tag,
                result: 0,
            }));
            return;
        }
        let Some(mut round) = self.take_round(Stage::Barrier) else {
            self.deferred.append(flushes);
            return;
        };
        round.reqs.extend(flushes.drain(..).map(|r| Req {
            orig: r,
            marked: false,
            tag: r.tag,
            page: 0,
            pages: 0,
            buf: std::ptr::null_mut(),
            dev: 0,
            job: 0,
            result: 0,
        }));
        self.record(round, done);
    }
}

impl PackedQueue {
    /// Moves every round whose event is done on: a compressed round to
    /// storing its blocks, a finished one to its answers.
    fn poll_rounds(&mut self, done: &mut Vec<Completion>) {
        let mut i = 0;
        while i < self.rounds.len() {
            let stage = self.rounds[i].stage;
            if stage == Stage::Barrier {
                if i == 0 {
                    if let Some(round) = self.rounds.pop_front() {
                        self.finish(round, false, done);
                    }
                    continue;
                }
                i += 1;
                continue;
            }
            // SAFETY: querying our own event.
            let r = unsafe { result::event::query(self.rounds[i].event) };
            if r == Err(DriverError(sys::CUresult::CUDA_ERROR_NOT_READY)) {
                i += 1;
                continue;
            }
            let ok = self.round_succeeded(r, self.rounds[i].stream);
            if stage == Stage::Compressing && ok {
                let Some(mut round) = self.rounds.remove(i) else {
                    break;
                };
                round.clock = stages::lap(Timed::Compress, round.clock);
                // Counted in flight when it started; those it defers are
                // not any more.
                self.in_flight -= self.store_blocks(&mut round);
                round.clock = stages::lap(Timed::Place, round.clock);
                if !self.record_event(&round) {
                    // SAFETY: waiting on our own stream.
                    let ok = unsafe { result::stream::synchronize(round.stream) }.is_ok();
                    self.finish(round, !ok, done);
                    continue;
                }
                self.rounds.insert(i, round);
                i += 1;
                continue;
            }
            let Some(round) = self.rounds.remove(i) else {
                break;
            };
            self.finish(round, !ok, done);
        }
    }
}

impl PackedQueue {
    /// Every stream the queue made (null where it did not get that far).
    fn all_streams(&self) -> impl Iterator<Item = sys::CUstream> {
        std::iter::once(self.stream)
            .chain(self.write_streams)
            .chain(self.read_streams)
    }
}

impl Drop for PackedQueue {
    fn drop(&mut self) {
        // SAFETY: tearing down what open() made, after the stream drains.
        unsafe {
            let _ = result::ctx::set_current(self.ctx);
            for s in self.all_streams().filter(|s| !s.is_null()) {
                let _ = result::stream::synchronize(s);
            }
            for r in &self.rounds {
                for &e in &r.pins {
                    self.extents.unpin(e);
                }
            }
            for r in self.rounds.drain(..).chain(self.spare.drain(..)) {
                r.free();
            }
            if !self.pinned.is_null() {
                sys::cuMemHostUnregister(self.pinned);
            }
            for &s in self.stagings.iter().filter(|&&s| s != 0) {
                let _ = result::free_sync(s);
            }
            for s in self.all_streams().filter(|s| !s.is_null()) {
                let _ = result::stream::destroy(s);
            }
        }
    }
}
