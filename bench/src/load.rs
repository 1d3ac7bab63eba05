//! Synthetic ublk-shaped load: per queue thread, a QueueEngine over the
//! store's queue handle, `depth` tags kept busy.

use cudarc::driver::sys;
use std::time::{Duration, Instant};
use vramblk_cuda_store::{CudaQueue, CudaStore, CudaStoreOptions, BACKOFF_STEP};
use vramblk_store::{BufferRegion, Completion, Op, Request, Store};
use vramblk_ublk_target::QueueEngine;

const MAX_IO: usize = 512 << 10;

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

pub(crate) fn slice(buf: vramblk_store::IoBuf) -> &'static mut [u8] {
    // SAFETY: each tag's slot is touched only by the thread that owns the
    // region, and only while no request on that tag is in flight.
    unsafe { std::slice::from_raw_parts_mut(buf.as_ptr(), buf.len()) }
}

/// One synthetic queue: the engine over the store's queue handle, and the
/// io buffers it reads and writes (declared after the engine, so they
/// outlive its pinned registration).
pub(crate) struct SynthQueue {
    pub(crate) engine: QueueEngine<CudaQueue>,
    pub(crate) bufs: BufferRegion,
}

impl SynthQueue {
    pub(crate) fn open(store: &CudaStore, qid: u16, depth: usize) -> SynthQueue {
        let bufs = BufferRegion::new(depth, MAX_IO).expect("io buffers");
        let q = store.open_queue(qid, &bufs).expect("queue");
        SynthQueue {
            engine: QueueEngine::new(q, store.size(), depth),
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

/// Random mixed requests of random sizes against a host shadow, in batches
/// of up to 16, on one queue over [lo, lo+len).
fn shadow_check(store: &CudaStore, qid: u16, lo: u64, len: u64, seed: u64) -> bool {
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
    let mut bad = 0;
    for _round in 0..300 {
        let n = 1 + rng.below(depth as u64) as usize;
        let mut expect: Vec<Option<(usize, Vec<u8>)>> = vec![None; depth];
        for (tag, expected) in expect.iter_mut().enumerate().take(n) {
            let buf = sq.bufs.slot(tag).unwrap();
            let size = (1 + rng.below(128)) * 4096;
            let off = rng.below((len - size) / 4096) * 4096;
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
                    for x in b.iter_mut() {
                        *x = rng.next() as u8;
                    }
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
                continue;
            }
            if let Some((size, want)) = &expect[c.tag as usize] {
                if slice(sq.bufs.slot(c.tag as usize).unwrap())[..*size] != want[..] {
                    bad += 1;
                }
            }
        }
    }
    bad == 0
}

pub fn checks(store: &CudaStore) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let half = 128u64 << 20;
    let ok = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2u16)
            .map(|q| {
                s.spawn(move || shadow_check(store, q, q as u64 * half, half, 0x9E37 + q as u64))
            })
            .collect();
        hs.into_iter().all(|h| h.join().unwrap_or(false))
    });
    out.push(("random mixed ops of random sizes, 2 queues, every byte against a host shadow, poisoned read buffers".into(), ok));

    let big = CudaStore::create(&CudaStoreOptions {
        size: 1 << 40,
        gpu: 0,
        reserve: 512 << 20,
    });
    let ok = match &big {
        Ok(b) => b.size() > 0 && b.size() % BACKOFF_STEP == 0 && b.size() < 1 << 40,
        Err(_) => false,
    };
    let granted = big.as_ref().map(|b| b.size() >> 20).unwrap_or(0);
    drop(big);
    out.push((
        format!(
            "back-off: 1 TiB asked, {granted} MiB granted in 512 MiB steps beside a live store"
        ),
        ok,
    ));

    let ok = store.erase().is_ok() && reads_zero(store);
    out.push((
        "erase() zeroes the device (read back 64 random 512 KiB ranges)".into(),
        ok,
    ));
    out
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
enum Pattern {
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
}

fn drive(store: &CudaStore, qid: u16, depth: usize, bs: u64, p: Pattern, secs: f64) -> Outcome {
    let mut sq = SynthQueue::open(store, qid, depth);
    let mut rng = Rng(0x1234_5678 ^ (qid as u64 + 1) << 20);
    let mut free: Vec<u16> = (0..depth as u16).collect();
    let mut issued = vec![Instant::now(); depth];
    let mut o = Outcome {
        ios: 0,
        bytes: 0,
        lat_us: Vec::new(),
        errors: 0,
    };
    let blocks = store.size() / bs;
    let mut seq = (qid as u64 * 7919) % blocks;
    let start = Instant::now();
    let stop = Duration::from_secs_f64(secs);
    let mut done = Vec::with_capacity(depth);
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
fn baseline(store: &CudaStore, write: bool, secs: f64) -> (f64, f64, f64) {
    store.make_current().unwrap();
    let len = 1usize << 30;
    let mut dev = 0;
    // SAFETY: plain driver calls on our own allocation.
    unsafe { sys::cuMemAlloc_v2(&mut dev, len) };
    let mut host = vec![7u8; 4096];
    let mut rng = Rng(99);
    let mut lat = Vec::new();
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
    // SAFETY: freeing our allocation.
    unsafe { sys::cuMemFree_v2(dev) };
    (iops, pct(&mut lat, 0.5), pct(&mut lat, 0.99))
}

pub fn bench(store: &CudaStore, secs: f64) -> String {
    let (base_w, bw50, bw99) = baseline(store, true, secs);
    let (base_r, br50, br99) = baseline(store, false, secs);
    let mut t = String::from("| shape | queues x depth | IOPS | GB/s | p50 us | p99 us | vs nbd-vram shape |\n| --- | --- | --- | --- | --- | --- | --- |\n");
    t += &format!("| baseline: nbd-vram shape, 4 KiB randwrite, sync cuMemcpy from pageable | 1 x 1 | {base_w:.0} | {:.2} | {bw50:.1} | {bw99:.1} | 1.0x |\n", base_w * 4096.0 / 1e9);
    t += &format!("| baseline: nbd-vram shape, 4 KiB randread | 1 x 1 | {base_r:.0} | {:.2} | {br50:.1} | {br99:.1} | 1.0x |\n", base_r * 4096.0 / 1e9);
    let shapes: &[(&str, Pattern, u64, u16, usize)] = &[
        ("4 KiB randwrite", Pattern::RandWrite, 4096, 1, 1),
        ("4 KiB randread", Pattern::RandRead, 4096, 1, 1),
        ("4 KiB randwrite", Pattern::RandWrite, 4096, 1, 32),
        ("4 KiB randread", Pattern::RandRead, 4096, 1, 32),
        ("4 KiB randwrite", Pattern::RandWrite, 4096, 16, 128),
        ("4 KiB randread", Pattern::RandRead, 4096, 16, 128),
        ("4 KiB 70/30 read/write", Pattern::Mix70, 4096, 16, 128),
        ("128 KiB seq write", Pattern::SeqWrite, 128 << 10, 4, 32),
        ("128 KiB seq read", Pattern::SeqRead, 128 << 10, 4, 32),
        ("512 KiB seq write", Pattern::SeqWrite, 512 << 10, 4, 32),
        ("512 KiB seq read", Pattern::SeqRead, 512 << 10, 4, 32),
    ];
    for &(name, p, bs, queues, depth) in shapes {
        let start = Instant::now();
        let outs: Vec<Outcome> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..queues)
                .map(|q| s.spawn(move || drive(store, q, depth, bs, p, secs)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("queue thread"))
                .collect()
        });
        let el = start.elapsed().as_secs_f64();
        let ios: u64 = outs.iter().map(|o| o.ios).sum();
        let bytes: u64 = outs.iter().map(|o| o.bytes).sum();
        let errors: u64 = outs.iter().map(|o| o.errors).sum();
        let mut lat: Vec<f64> = outs.into_iter().flat_map(|o| o.lat_us).collect();
        let iops = ios as f64 / el;
        let base = if matches!(p, Pattern::RandRead | Pattern::SeqRead) {
            base_r
        } else {
            base_w
        };
        let ratio = if bs == 4096 {
            format!("{:.1}x", iops / base)
        } else {
            "-".into()
        };
        t += &format!(
            "| {name}{} | {queues} x {depth} | {iops:.0} | {:.2} | {:.1} | {:.1} | {ratio} |\n",
            if errors > 0 {
                format!(" ({errors} errors)")
            } else {
                String::new()
            },
            bytes as f64 / el / 1e9,
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99)
        );
    }
    t
}
