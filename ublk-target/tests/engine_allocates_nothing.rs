//! The queue engine over the host store allocates nothing once it serves.
//!
//! A swap device's server is asked for pages while memory is short, and an
//! allocation then may wait for memory only its own device can free
//! (docs/design.md, "No allocation while serving"). engine-bench checks
//! the CUDA store's queues on the GPU (and the stand-in libcuda); this
//! checks the other half of a host device's hot path: the engine (batching,
//! rounds, counters, latency samples) and the host store's queue, under
//! every op and size, invalid requests among them. Its own binary, for its
//! counting allocator (vramblk-alloc-count, which engine-bench uses too).

use std::sync::Arc;
use vramblk_alloc_count::{armed, counted, Counting};
use vramblk_host_store::{HostStore, HostStoreOptions};
use vramblk_store::{BufferRegion, Completion, Op, QueueStore, Request, Store};
use vramblk_ublk_target::{DeviceCounters, QueueEngine};

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The count is one for every armed thread: the tests take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Allocations this thread makes inside `f` (no other test counts
/// meanwhile).
fn allocations_in(f: impl FnOnce()) -> u64 {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let before = counted();
    armed(f);
    counted() - before
}

const DEPTH: usize = 64;
const IO_BYTES: usize = 128 << 10;
const SIZE: u64 = 32 << 20;

/// A small xorshift: the same requests every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One random request for `tag`: every op, 512 B to the buffer's size,
/// and one in 16 invalid (past the device's end, or longer than its
/// buffer), which the engine answers itself.
fn request(rng: &mut Rng, bufs: &BufferRegion, tag: u16) -> Request {
    let op = match rng.below(16) {
        0..=6 => Op::Write,
        7..=12 => Op::Read,
        13 => Op::Discard,
        14 => Op::WriteZeroes,
        _ => Op::Flush,
    };
    let sectors = 1 + rng.below((IO_BYTES / 512) as u64);
    let len = (sectors * 512) as u32;
    let mut offset = rng.below(SIZE / 512 - sectors) * 512;
    let mut len = if op == Op::Flush { 0 } else { len };
    match rng.below(32) {
        0 => offset = SIZE - 512,
        1 => len = IO_BYTES as u32 + 4096,
        _ => {}
    }
    Request {
        tag,
        op,
        offset,
        len,
        buf: bufs.slot(usize::from(tag)).expect("a slot per tag"),
    }
}

/// Serves `rounds` batches of 1..=DEPTH random requests through `engine`,
/// each to its end; returns how many requests finished.
fn serve<Q: QueueStore>(
    engine: &mut QueueEngine<Q>,
    bufs: &BufferRegion,
    rng: &mut Rng,
    rounds: usize,
    done: &mut Vec<Completion>,
) -> usize {
    let mut finished = 0;
    for _ in 0..rounds {
        let n = 1 + rng.below(DEPTH as u64) as u16;
        for tag in 0..n {
            engine.enqueue(request(rng, bufs, tag));
        }
        let mut left = usize::from(n);
        while left > 0 {
            left -= engine.pump(|c| done.push(c));
        }
        finished += done.len();
        done.clear();
    }
    finished
}

#[test]
fn the_engine_over_the_host_store_allocates_nothing_once_serving() {
    let store = HostStore::create(&HostStoreOptions {
        size: SIZE,
        hugetlb: false,
    })
    .expect("a memfd store");
    let bufs = BufferRegion::new(DEPTH, IO_BYTES).expect("io buffers");
    let queue = store.open_queue(0, &bufs).expect("a queue");
    let counters = Arc::new(DeviceCounters::new(1));
    let mut engine = QueueEngine::new(queue, SIZE, DEPTH)
        .with_max_round(DEPTH / 2)
        .with_counters(counters.clone(), 0);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut done = Vec::with_capacity(DEPTH);
    // First uses (the counters' clock, lazily made statics) are the
    // server's start, not its serving.
    serve(&mut engine, &bufs, &mut rng, 8, &mut done);
    let mut finished = 0;
    let counted = allocations_in(|| {
        finished = serve(&mut engine, &bufs, &mut rng, 2000, &mut done);
    });
    assert!(finished > 2000 * DEPTH / 4, "{finished} requests served");
    let snap = counters.snapshot();
    assert!(
        snap.reads > 0 && snap.writes > 0 && snap.errors > 0,
        "{snap:?}"
    );
    assert_eq!(
        counted, 0,
        "{counted} heap allocations while serving {finished} requests"
    );
}

/// The check can fail: a store that allocates per submit is counted.
#[test]
fn an_allocating_store_is_caught() {
    struct Allocating(Vec<Vec<u8>>);
    impl QueueStore for Allocating {
        fn submit(&mut self, batch: &mut Vec<Request>, done: &mut Vec<Completion>) {
            for r in batch.drain(..) {
                self.0.push(vec![0; 16]);
                done.push(Completion {
                    tag: r.tag,
                    result: 0,
                });
            }
        }
        fn poll(&mut self, _done: &mut Vec<Completion>) {}
        fn in_flight(&self) -> usize {
            0
        }
    }
    let bufs = BufferRegion::new(DEPTH, IO_BYTES).expect("io buffers");
    let mut engine = QueueEngine::new(Allocating(Vec::new()), SIZE, DEPTH);
    let mut rng = Rng(7);
    let mut done = Vec::with_capacity(DEPTH);
    let counted = allocations_in(|| {
        serve(&mut engine, &bufs, &mut rng, 10, &mut done);
    });
    assert!(counted >= 10, "only {counted} allocations counted");
}
