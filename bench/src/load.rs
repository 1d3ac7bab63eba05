//! Synthetic ublk-shaped load: per queue thread, a QueueEngine over the
//! store's queue handle, `depth` tags kept busy.

use cudarc::driver::sys;
use std::time::{Duration, Instant};
use vramblk_cuda_store::stages::StageTotals;
use vramblk_cuda_store::{CudaStore, CudaStoreOptions, StoreQueue, BACKOFF_STEP};
use vramblk_store::{BufferRegion, Completion, Op, Request, Store};
use vramblk_ublk_target::engine::round_limit;
use vramblk_ublk_target::poll_policy::{PollPolicy, Wait};
use vramblk_ublk_target::QueueEngine;

use crate::table::{Row, BASELINE};

const MAX_IO: usize = 512 << 10;

pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub(crate) fn slice(buf: vramblk_store::IoBuf) -> &'static mut [u8] {
    // SAFETY: each tag's slot is touched only by the thread that owns the
    // region, and only while no request on that tag is in flight.
    unsafe { std::slice::from_raw_parts_mut(buf.as_ptr(), buf.len()) }
}

/// One synthetic queue: the engine over the store's queue handle, and the
/// io buffers it reads and writes (declared after the engine, so they
/// outlive its pinned registration).
pub(crate) struct SynthQueue {
    pub(crate) engine: QueueEngine<StoreQueue>,
    pub(crate) bufs: BufferRegion,
}

impl SynthQueue {
    pub(crate) fn open(store: &CudaStore, qid: u16, depth: usize) -> SynthQueue {
        Self::open_with_rounds(store, qid, depth, usize::MAX)
    }

    /// A queue whose engine hands the store at most `max_round` requests
    /// per round.
    fn open_with_rounds(store: &CudaStore, qid: u16, depth: usize, max_round: usize) -> SynthQueue {
        let bufs = BufferRegion::new(depth, MAX_IO).expect("io buffers");
        let q = store.open_queue(qid, &bufs).expect("queue");
        SynthQueue {
            engine: QueueEngine::new(q, store.size(), depth).with_max_round(max_round),
            bufs,
        }
    }

    /// Pumps until every enqueued request has finished.
    pub(crate) fn finish(&mut self, mut complete: impl FnMut(Completion)) {
        while self.engine.has_work() {
            self.engine.pump(&mut complete);
        }
    }
}

/// The smallest request the store serves: a store with checksums whole
/// 4 KiB pages, as the device's 4 KiB logical blocks ask of the kernel;
/// without them, any sector.
fn io_unit(store: &CudaStore) -> u64 {
    if store.integrity() || store.compress().is_on() {
        4096
    } else {
        512
    }
}

/// What the pages a check writes hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Content {
    /// Random bytes (incompressible).
    Random,
    /// Per page, one of: zeros, one repeated word, text-like bytes that
    /// compress, random bytes (every way a compressed store keeps a page).
    Mixed,
}

/// Fills `b` (whole pages for `Mixed`) with `content`.
pub(crate) fn fill_content(b: &mut [u8], content: Content, rng: &mut Rng) {
    if content == Content::Random {
        for x in b.iter_mut() {
            *x = rng.next() as u8;
        }
        return;
    }
    for page in b.chunks_mut(4096) {
        match rng.below(4) {
            0 => page.fill(0),
            1 => {
                let word = rng.next().to_ne_bytes();
                for (i, x) in page.iter_mut().enumerate() {
                    *x = word[i % 8];
                }
            }
            2 => {
                // Words from a small vocabulary: compresses about 3x.
                let words: [&[u8]; 6] = [
                    b"swap ",
                    b"page ",
                    b"vram ",
                    b"0x7f3a ",
                    b"NULL ",
                    b"\0\0\0\0 ",
                ];
                let mut at = 0;
                while at < page.len() {
                    let w = words[rng.below(words.len() as u64) as usize];
                    let n = w.len().min(page.len() - at);
                    page[at..at + n].copy_from_slice(&w[..n]);
                    at += n;
                }
            }
            _ => {
                for x in page.iter_mut() {
                    *x = rng.next() as u8;
                }
            }
        }
    }
}

/// Random mixed requests of random sizes against a host shadow, in batches
/// of up to 16, on one queue over [lo, lo+len).
pub(crate) fn shadow_check(store: &CudaStore, qid: u16, lo: u64, len: u64, seed: u64) -> bool {
    shadow_check_of(store, qid, lo, len, seed, Content::Random)
}

/// [`shadow_check`] writing pages that hold `content`.
pub(crate) fn shadow_check_of(
    store: &CudaStore,
    qid: u16,
    lo: u64,
    len: u64,
    seed: u64,
    content: Content,
) -> bool {
    let depth = 16;
    let mut sq = SynthQueue::open(store, qid, depth);
    let mut shadow = vec![0u8; len as usize];
    let mut rng = Rng(seed | 1);
    // Zero the range first so the shadow starts true.
    sq.engine.enqueue(Request {
        tag: 0,
        op: Op::WriteZeroes,
        offset: lo,
        len: len as u32,
        buf: sq.bufs.slot(0).unwrap(),
    });
    sq.finish(|_| {});
    let unit = io_unit(store);
    let mut bad = 0;
    for round in 0..300 {
        let n = 1 + rng.below(depth as u64) as usize;
        let mut expect: Vec<Option<(usize, Vec<u8>)>> = vec![None; depth];
        // Requests in flight together may complete in any order (the
        // block layer promises nothing between them), so no two of a
        // round overlap, as with a real submitter.
        let mut taken: Vec<(u64, u64)> = Vec::new();
        for (tag, expected) in expect.iter_mut().enumerate().take(n) {
            let buf = sq.bufs.slot(tag).unwrap();
            // Whole units, up to 512 KiB, in rounds of 1 to 16: the copy
            // engines and the kernel both get every shape.
            let size = (1 + rng.below(MAX_IO as u64 / unit)) * unit;
            let mut off = rng.below((len - size) / unit) * unit;
            for _ in 0..64 {
                if taken.iter().all(|&(a, b)| off + size <= a || off >= b) {
                    break;
                }
                off = rng.below((len - size) / unit) * unit;
            }
            if taken.iter().any(|&(a, b)| off + size > a && off < b) {
                continue;
            }
            taken.push((off, off + size));
            let op = match rng.below(20) {
                0..=9 => Op::Write,
                10..=16 => Op::Read,
                17..=18 => Op::WriteZeroes,
                _ => Op::Flush,
            };
            let range = off as usize..(off + size) as usize;
            match op {
                Op::Write => {
                    let b = &mut slice(buf)[..size as usize];
                    fill_content(b, content, &mut rng);
                    shadow[range].copy_from_slice(b);
                }
                Op::Read => {
                    slice(buf)[..size as usize].fill(0xA5);
                    *expected = Some((size as usize, shadow[range].to_vec()));
                }
                Op::WriteZeroes => shadow[range].fill(0),
                _ => {}
            }
            let (offset, len) = if op == Op::Flush {
                (0, 0)
            } else {
                (lo + off, size as u32)
            };
            sq.engine.enqueue(Request {
                tag: tag as u16,
                op,
                offset,
                len,
                buf,
            });
        }
        let mut got: Vec<Completion> = Vec::new();
        sq.finish(|c| got.push(c));
        for c in got {
            if c.result < 0 {
                bad += 1;
                if bad <= 3 {
                    println!(
                        "  queue {qid} round {round} tag {}: error {}",
                        c.tag, c.result
                    );
                }
                continue;
            }
            if let Some((size, want)) = &expect[c.tag as usize] {
                let have = &slice(sq.bufs.slot(c.tag as usize).unwrap())[..*size];
                if have != &want[..] {
                    bad += 1;
                    if bad <= 3 {
                        let first = have.iter().zip(want).position(|(a, b)| a != b);
                        let wrong = have.iter().zip(want).filter(|(a, b)| a != b).count();
                        println!("  queue {qid} round {round} tag {}: read of {size} B differs from byte {first:?} ({wrong} bytes wrong)", c.tag);
                    }
                }
            }
        }
    }
    bad == 0
}

/// The data checks for one store (run once per copy mode).
pub fn data_checks(store: &CudaStore, mode: &str) -> Vec<(String, bool)> {
    let queues = 4u16;
    let part = (store.size() / queues as u64).min(128 << 20) & !4095;
    let ok = std::thread::scope(|s| {
        let hs: Vec<_> = (0..queues)
            .map(|q| {
                s.spawn(move || shadow_check(store, q, q as u64 * part, part, 0x9E37 + q as u64))
            })
            .collect();
        hs.into_iter().all(|h| h.join().unwrap_or(false))
    });
    let unit = match io_unit(store) {
        4096 => "4 KiB",
        _ => "512 B",
    };
    vec![(format!("{mode}: random mixed ops ({unit} - 512 KiB, write/read/write-zeroes/flush), {queues} queues at once, every byte against a host shadow, read buffers poisoned first"), ok)]
}

/// Holds `len` bytes of VRAM (plain cuMemAlloc) until dropped, as another
/// GPU program would.
struct HeldVram(sys::CUdeviceptr);

impl HeldVram {
    fn take(store: &CudaStore, len: usize) -> Option<HeldVram> {
        store.make_current().ok()?;
        let mut p = 0;
        // SAFETY: valid out-pointer.
        let r = unsafe { sys::cuMemAlloc_v2(&mut p, len) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(HeldVram(p))
    }
}

impl Drop for HeldVram {
    fn drop(&mut self) {
        // SAFETY: freeing our own allocation.
        unsafe { sys::cuMemFree_v2(self.0) };
    }
}

/// Free VRAM on the store's GPU now.
pub(crate) fn free_vram(store: &CudaStore) -> u64 {
    let (mut free, mut total) = (0usize, 0usize);
    let _ = store.make_current();
    // SAFETY: valid out-pointers.
    unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) };
    free as u64
}

/// The back-off path and erase, once per run.
pub fn store_checks(store: &CudaStore) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    // Another program holds all but 3 GiB; a 4 GiB device must come out
    // smaller, in whole 512 MiB steps, leaving the 512 MiB reserve.
    let leave = 3u64 << 30;
    let free = free_vram(store);
    let held = free
        .checked_sub(leave)
        .and_then(|h| HeldVram::take(store, (h - h % (2 << 20)) as usize));
    let (ok, text) = match held {
        None => (
            false,
            format!("could not hold {} MiB", free.saturating_sub(leave) >> 20),
        ),
        Some(held) => {
            let left = free_vram(store);
            let small = CudaStore::create(&CudaStoreOptions::new(4 << 30, 0));
            let r = match &small {
                Ok(b) => (
                    b.size() > 0
                        && b.size() % BACKOFF_STEP == 0
                        && b.size() < 4 << 30
                        && b.size() + (512 << 20) <= left,
                    format!("{} MiB free, {} MiB granted", left >> 20, b.size() >> 20),
                ),
                Err(e) => (false, format!("{} MiB free, failed: {e}", left >> 20)),
            };
            drop(small);
            drop(held);
            r
        }
    };
    out.push((
        format!("back-off: another allocation holds all but 3 GiB, 4 GiB asked: {text} (whole 512 MiB steps, reserve kept)"),
        ok,
    ));
    let hold_all = HeldVram::take(store, (free_vram(store).saturating_sub(256 << 20)) as usize);
    let short = CudaStore::create(&CudaStoreOptions::new(4 << 30, 0));
    let said = match &short {
        Err(e) => e.to_string(),
        Ok(_) => "a store was created".into(),
    };
    out.push((
        format!("VRAM short: with all but 256 MiB held, creating fails with: {said}"),
        hold_all.is_some() && short.is_err(),
    ));
    drop((short, hold_all));

    out.push((
        "erase on release: a dropped store's VRAM, kept alive through a dup of its fds, reads back as zeroes".into(),
        erased_on_release(),
    ));
    out
}

/// Fills a 256 MiB store with 0x5A, keeps its VRAM alive through dups of
/// its exported fds, drops it, imports the VRAM again and reads zeroes.
fn erased_on_release() -> bool {
    let Ok(a) = CudaStore::create(&CudaStoreOptions::new(256 << 20, 0)) else {
        return false;
    };
    let size = a.size();
    let mut sq = SynthQueue::open(&a, 0, 1);
    let buf = sq.bufs.slot(0).unwrap();
    slice(buf).fill(0x5A);
    for off in (0..size).step_by(MAX_IO) {
        sq.engine.enqueue(Request {
            tag: 0,
            op: Op::Write,
            offset: off,
            len: MAX_IO as u32,
            buf,
        });
        sq.finish(|_| {});
    }
    drop(sq);
    let kept: Vec<(usize, std::os::fd::OwnedFd)> = a.exported_chunks().unwrap_or_default();
    drop(a);
    let borrowed: Vec<(usize, std::os::fd::BorrowedFd)> = kept
        .iter()
        .map(|(l, f)| (*l, std::os::fd::AsFd::as_fd(f)))
        .collect();
    match CudaStore::import(&CudaStoreOptions::new(size, 0), &borrowed) {
        Ok(b) => {
            b.set_erase_on_drop(false);
            reads_zero(&b)
        }
        Err(e) => {
            println!("erase on release: import failed: {e}");
            false
        }
    }
}

fn reads_zero(store: &CudaStore) -> bool {
    let mut sq = SynthQueue::open(store, 9, 1);
    let mut rng = Rng(77);
    let buf = sq.bufs.slot(0).unwrap();
    for _ in 0..64 {
        slice(buf).fill(0xA5);
        let off = rng.below(store.size() / MAX_IO as u64) * MAX_IO as u64;
        sq.engine.enqueue(Request {
            tag: 0,
            op: Op::Read,
            offset: off,
            len: MAX_IO as u32,
            buf,
        });
        sq.finish(|_| {});
        if slice(buf).iter().any(|&b| b != 0) {
            return false;
        }
    }
    true
}

#[derive(Clone, Copy)]
pub(crate) enum Pattern {
    RandRead,
    RandWrite,
    Mix70,
    SeqRead,
    SeqWrite,
}

struct Outcome {
    ios: u64,
    bytes: u64,
    lat_us: Vec<f64>,
    errors: u64,
    /// CPU time the queue thread used (its thread CPU clock).
    cpu_ns: u64,
}

/// The calling thread's CPU clock: what a queue thread costs the host,
/// busy-polling included, and nothing of other threads'.
fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// How a load thread runs its queue: when it naps, and how its engine
/// cuts a full batch into rounds.
#[derive(Clone, Copy)]
pub struct Looping {
    pub policy: PollPolicy,
    pub rounds: Rounds,
}

/// How many rounds a full queue's batch goes as.
#[derive(Clone, Copy)]
pub enum Rounds {
    One,
    /// Half the depth each, whatever the server does.
    Two,
    /// As the server's queues do (`engine::round_limit`).
    Server,
    Four,
}

impl Rounds {
    fn max_round(self, queues: u16, depth: usize) -> usize {
        match self {
            Rounds::One => usize::MAX,
            Rounds::Two => depth.div_ceil(2).max(1),
            Rounds::Server => round_limit(queues as usize, depth),
            Rounds::Four => depth.div_ceil(4).max(1),
        }
    }
}

impl Looping {
    /// The tables' loop: polling without a nap, rounds as the server cuts
    /// them.
    const SPIN: Looping = Looping {
        policy: PollPolicy::SPIN_ONLY,
        rounds: Rounds::Server,
    };
}

#[allow(clippy::too_many_arguments)]
fn drive(
    store: &CudaStore,
    qid: u16,
    queues: u16,
    depth: usize,
    bs: u64,
    p: Pattern,
    secs: f64,
    looping: Looping,
) -> Outcome {
    precise_naps();
    let policy = looping.policy;
    let max_round = looping.rounds.max_round(queues, depth);
    let mut sq = SynthQueue::open_with_rounds(store, qid, depth, max_round);
    prefill(&sq, qid, depth, bs);
    let mut rng = Rng(0x1234_5678 ^ (qid as u64 + 1) << 20);
    let mut free: Vec<u16> = (0..depth as u16).collect();
    let mut issued = vec![Instant::now(); depth];
    let cpu_start = thread_cpu_ns();
    let mut o = Outcome {
        ios: 0,
        bytes: 0,
        lat_us: Vec::new(),
        errors: 0,
        cpu_ns: 0,
    };
    let blocks = store.size() / bs;
    let mut seq = (qid as u64 * 7919) % blocks;
    let start = Instant::now();
    let stop = Duration::from_secs_f64(secs);
    let mut done = Vec::with_capacity(depth);
    let mut last_progress = Instant::now();
    while start.elapsed() < stop {
        for tag in free.drain(..) {
            let off = match p {
                Pattern::SeqRead | Pattern::SeqWrite => {
                    seq = (seq + 1) % blocks;
                    seq * bs
                }
                _ => rng.below(blocks) * bs,
            };
            let op = match p {
                Pattern::RandRead | Pattern::SeqRead => Op::Read,
                Pattern::RandWrite | Pattern::SeqWrite => Op::Write,
                Pattern::Mix70 => {
                    if rng.below(10) < 7 {
                        Op::Read
                    } else {
                        Op::Write
                    }
                }
            };
            issued[tag as usize] = Instant::now();
            sq.engine.enqueue(Request {
                tag,
                op,
                offset: off,
                len: bs as u32,
                buf: sq.bufs.slot(tag as usize).unwrap(),
            });
        }
        sq.engine.pump(|c| done.push(c));
        if !done.is_empty() {
            last_progress = Instant::now();
        } else if let Wait::Nap(nap) = policy.wait(last_progress.elapsed()) {
            std::thread::sleep(nap);
        }
        for c in done.drain(..) {
            o.ios += 1;
            o.bytes += bs;
            if c.result < 0 {
                o.errors += 1;
            }
            if o.lat_us.len() < 200_000 {
                o.lat_us
                    .push(issued[c.tag as usize].elapsed().as_secs_f64() * 1e6);
            }
            free.push(c.tag);
        }
    }
    sq.finish(|_| {});
    o.cpu_ns = thread_cpu_ns() - cpu_start;
    o
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// nbd-vram's shape: one thread, one synchronous cuMemcpy per 4 KiB
/// request from a pageable buffer.
fn baseline(store: &CudaStore, write: bool, secs: f64) -> Row {
    store.make_current().unwrap();
    let len = 1usize << 30;
    let mut dev = 0;
    // SAFETY: plain driver calls on our own allocation.
    unsafe { sys::cuMemAlloc_v2(&mut dev, len) };
    let mut host = vec![7u8; 4096];
    let mut rng = Rng(99);
    let mut lat = Vec::new();
    let cpu_start = thread_cpu_ns();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        let off = rng.below((len / 4096) as u64) * 4096;
        let t = Instant::now();
        // SAFETY: host is 4096 bytes, dev+off inside the allocation.
        unsafe {
            if write {
                sys::cuMemcpyHtoD_v2(dev + off, host.as_ptr().cast(), 4096);
            } else {
                sys::cuMemcpyDtoH_v2(host.as_mut_ptr().cast(), dev + off, 4096);
            }
        }
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        n += 1;
    }
    let iops = n as f64 / start.elapsed().as_secs_f64();
    let cpu_ns = thread_cpu_ns() - cpu_start;
    // SAFETY: freeing our allocation.
    unsafe { sys::cuMemFree_v2(dev) };
    Row {
        name: format!(
            "baseline: nbd-vram shape, 4 KiB rand{}, sync cuMemcpy from pageable",
            if write { "write" } else { "read" }
        ),
        mode: BASELINE.into(),
        read: !write,
        bs: 4096,
        queues: 1,
        depth: 1,
        iops,
        gbps: iops * 4096.0 / 1e9,
        p50: pct(&mut lat, 0.5),
        p99: pct(&mut lat, 0.99),
        errors: 0,
        cpu_us_per_io: cpu_ns as f64 / 1e3 / n.max(1) as f64,
        stages: StageTotals::default(),
    }
}

/// Every shape on each (mode, store) given, after the nbd-vram-shaped
/// baseline, all in this process.
pub fn bench(stores: &[(&str, &CudaStore)], secs: f64) -> Vec<Row> {
    let Some(&(_, first)) = stores.first() else {
        return Vec::new();
    };
    let mut rows = vec![baseline(first, true, secs), baseline(first, false, secs)];
    for &(mode, store) in stores {
        map_every_extent(store);
        for &shape in SHAPES {
            rows.push(spin_shape(store, mode, shape, secs));
        }
    }
    rows
}

/// The polling policies measured side by side (issue 19): never napping
/// (the load loop of the tables above), the server's queue loop, and
/// napping as soon as nothing finished.
pub const POLICIES: [(&str, PollPolicy); 3] = [
    ("spin only", PollPolicy::SPIN_ONLY),
    ("server: spin 50 us, then nap 20 us", PollPolicy::SERVER),
    (
        "nap 20 us at once",
        PollPolicy {
            spin: Duration::ZERO,
            nap: Duration::from_micros(20),
        },
    ),
];

/// The 4 KiB random shapes at QD1, 1 x 32 and 16 x 128 under each of
/// [`POLICIES`] on `store` (auto); the mode column names the policy.
pub fn poll_policies(store: &CudaStore, secs: f64) -> Vec<Row> {
    let shapes = [
        ("4 KiB randwrite", Pattern::RandWrite, 1, 1),
        ("4 KiB randread", Pattern::RandRead, 1, 1),
        ("4 KiB randwrite", Pattern::RandWrite, 1, 32),
        ("4 KiB randread", Pattern::RandRead, 1, 32),
        ("4 KiB randwrite", Pattern::RandWrite, 16, 128),
        ("4 KiB randread", Pattern::RandRead, 16, 128),
    ];
    let mut rows = Vec::new();
    for (name, p, queues, depth) in shapes {
        for (label, policy) in POLICIES {
            let looping = Looping {
                policy,
                rounds: Rounds::Server,
            };
            rows.push(run_shape(
                store, label, name, p, 4096, queues, depth, secs, looping,
            ));
        }
    }
    rows
}

/// Rounds per queue (issue 19): a full queue's batch as one round or as
/// two, at 1 to 16 queues of depth 32, 64 (the server's default) and 128,
/// 4 KiB random, on `store` (auto), polling without a nap; the mode column
/// says which. What `engine::round_limit` was chosen by.
pub fn round_sizes(store: &CudaStore, secs: f64) -> Vec<Row> {
    round_sweep(store, secs, &[1, 2, 4, 8, 16], &[32, 64, 128], false)
}

/// One round beside two (and four, with `four`) for every queue count
/// and depth given, 4 KiB random writes and reads.
pub fn round_sweep(
    store: &CudaStore,
    secs: f64,
    queue_counts: &[u16],
    depths: &[usize],
    four: bool,
) -> Vec<Row> {
    let mut shapes = Vec::new();
    for &depth in depths {
        for &queues in queue_counts {
            shapes.push(("4 KiB randwrite", Pattern::RandWrite, queues, depth));
            shapes.push(("4 KiB randread", Pattern::RandRead, queues, depth));
        }
    }
    let mut rows = Vec::new();
    for (name, p, queues, depth) in shapes {
        for (label, rounds) in [
            ("one round", Rounds::One),
            ("two rounds", Rounds::Two),
            ("four rounds", Rounds::Four),
        ] {
            if matches!(rounds, Rounds::Four) && !four {
                continue;
            }
            let looping = Looping {
                policy: PollPolicy::SPIN_ONLY,
                rounds,
            };
            rows.push(run_shape(
                store, label, name, p, 4096, queues, depth, secs, looping,
            ));
        }
    }
    rows
}

/// A nap asks for 20 us: the thread's timer slack (50 us by default)
/// would stretch every sleep by up to that much, where the server's nap in
/// io_uring is a precise timeout. So the load threads ask for 1 us.
fn precise_naps() {
    // libc: rustix has no PR_SET_TIMERSLACK call.
    // SAFETY: prctl with constant arguments on this thread; a failure only
    // leaves the default slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000, 0, 0, 0) };
}

/// One write per 2 MiB extent, so every read below moves real VRAM (an
/// extent never written reads as zeros without touching the GPU).
pub(crate) fn map_every_extent(store: &CudaStore) {
    let mut sq = SynthQueue::open(store, 0, 1);
    let buf = sq.bufs.slot(0).expect("a buffer");
    for off in (0..store.size()).step_by(2 << 20) {
        sq.engine.enqueue(Request {
            tag: 0,
            op: Op::Write,
            offset: off,
            len: 4096,
            buf,
        });
        sq.finish(|_| {});
    }
}

const SHAPES: &[Shape] = &[
    ("4 KiB randwrite", Pattern::RandWrite, 4096, 1, 1),
    ("4 KiB randread", Pattern::RandRead, 4096, 1, 1),
    ("4 KiB randwrite", Pattern::RandWrite, 4096, 1, 32),
    ("4 KiB randread", Pattern::RandRead, 4096, 1, 32),
    ("4 KiB randwrite", Pattern::RandWrite, 4096, 1, 128),
    ("4 KiB randread", Pattern::RandRead, 4096, 1, 128),
    ("4 KiB randwrite", Pattern::RandWrite, 4096, 16, 128),
    ("4 KiB randread", Pattern::RandRead, 4096, 16, 128),
    ("4 KiB 70/30 read/write", Pattern::Mix70, 4096, 16, 128),
    ("128 KiB seq write", Pattern::SeqWrite, 128 << 10, 4, 32),
    ("128 KiB seq read", Pattern::SeqRead, 128 << 10, 4, 32),
    ("512 KiB seq write", Pattern::SeqWrite, 512 << 10, 4, 32),
    ("512 KiB seq read", Pattern::SeqRead, 512 << 10, 4, 32),
];

/// The shapes the several-GPU table times (issue 21): 4 KiB random at
/// 16 x 128 and 512 KiB sequential at 4 x 32, each way.
pub const GPU_SHAPES: usize = 4;

/// Shape `i` of the several-GPU table on `store` (the tables' loop).
pub fn gpu_shape(store: &CudaStore, i: usize, secs: f64) -> Row {
    let shape: Shape = [
        ("4 KiB randwrite", Pattern::RandWrite, 4096, 16, 128),
        ("4 KiB randread", Pattern::RandRead, 4096, 16, 128),
        ("512 KiB seq write", Pattern::SeqWrite, 512 << 10, 4, 32),
        ("512 KiB seq read", Pattern::SeqRead, 512 << 10, 4, 32),
    ][i % GPU_SHAPES];
    spin_shape(store, "auto", shape, secs)
}

/// A shape: its name, pattern, block size, queues and depth.
pub(crate) type Shape = (&'static str, Pattern, u64, u16, usize);

/// What the io buffers of the tables' loads hold before their writes (a
/// compressed store's speed depends on it): None, zeros as allocated.
static WRITE_CONTENT: std::sync::RwLock<Option<std::sync::Arc<Vec<u8>>>> =
    std::sync::RwLock::new(None);

/// Sets what the io buffers of the loads that follow hold before their
/// writes (whole pages, used in turn; None: zeros).
pub(crate) fn set_write_content(pages: Option<std::sync::Arc<Vec<u8>>>) {
    *WRITE_CONTENT.write().unwrap_or_else(|p| p.into_inner()) = pages;
}

/// Fills queue `qid`'s io buffers from the write content, if any, each tag
/// with other pages.
fn prefill(sq: &SynthQueue, qid: u16, depth: usize, bs: u64) {
    let content = WRITE_CONTENT
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let Some(pages) = content.filter(|p| p.len() >= 4096) else {
        return;
    };
    let n = pages.len() / 4096;
    for tag in 0..depth {
        let Some(buf) = sq.bufs.slot(tag) else {
            continue;
        };
        let b = &mut slice(buf)[..bs as usize];
        for (k, page) in b.chunks_mut(4096).enumerate() {
            let at = (usize::from(qid) * 7919 + tag * 131 + k) % n * 4096;
            page.copy_from_slice(&pages[at..at + page.len()]);
        }
    }
}

/// `shape` on `store`, its load threads waiting as `policy` says (the
/// server's queue-loop policy, or the tables' polling), rounds as the
/// server cuts them; the row named `mode`.
pub(crate) fn policy_shape_row(
    store: &CudaStore,
    mode: &str,
    shape: Shape,
    secs: f64,
    policy: PollPolicy,
) -> Row {
    let (name, p, bs, queues, depth) = shape;
    let looping = Looping {
        policy,
        rounds: Rounds::Server,
    };
    run_shape(store, mode, name, p, bs, queues, depth, secs, looping)
}

/// `shape` on `store` under the tables' loop (polling without a nap,
/// rounds as the server cuts them).
fn spin_shape(store: &CudaStore, mode: &str, shape: Shape, secs: f64) -> Row {
    policy_shape_row(store, mode, shape, secs, Looping::SPIN.policy)
}

#[allow(clippy::too_many_arguments)]
fn run_shape(
    store: &CudaStore,
    mode: &str,
    name: &str,
    p: Pattern,
    bs: u64,
    queues: u16,
    depth: usize,
    secs: f64,
    looping: Looping,
) -> Row {
    // What earlier shapes (and their drains) left is not this shape's.
    let _ = StageTotals::take();
    let start = Instant::now();
    let outs: Vec<Outcome> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..queues)
            .map(|q| s.spawn(move || drive(store, q, queues, depth, bs, p, secs, looping)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("queue thread"))
            .collect()
    });
    let el = start.elapsed().as_secs_f64();
    let ios: u64 = outs.iter().map(|o| o.ios).sum();
    let bytes: u64 = outs.iter().map(|o| o.bytes).sum();
    let errors: u64 = outs.iter().map(|o| o.errors).sum();
    let cpu_ns: u64 = outs.iter().map(|o| o.cpu_ns).sum();
    let mut lat: Vec<f64> = outs.into_iter().flat_map(|o| o.lat_us).collect();
    Row {
        name: name.to_string(),
        mode: mode.to_string(),
        read: matches!(p, Pattern::RandRead | Pattern::SeqRead),
        bs,
        queues,
        depth,
        iops: ios as f64 / el,
        gbps: bytes as f64 / el / 1e9,
        p50: pct(&mut lat, 0.5),
        p99: pct(&mut lat, 0.99),
        errors,
        cpu_us_per_io: cpu_ns as f64 / 1e3 / ios.max(1) as f64,
        stages: StageTotals::take(),
    }
}
