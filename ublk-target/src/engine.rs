//! Per-queue batching: requests collected during one round go to the store
//! in one `submit`; completions come back from `poll`.

use crate::counters::DeviceCounters;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;
use vramblk_store::{Completion, Op, QueueStore, Request};

/// The most requests per round for one of `queues` queues of `depth`:
/// half of it where that was measured to help, so a full queue keeps two
/// rounds in flight and the store builds one while the GPU moves the
/// other; else the whole depth (one round). Measured on the H200 with
/// engine-bench (docs/benchmarks.md), 4 KiB random, two rounds against
/// one: depth 128, 1.03-1.45x at every queue count from 1 to 16; depth
/// 64, 1.08-1.36x at 1-8 queues but 0.68-1.00x at 16 (runs differ);
/// depth 32 (rounds of 16), 1.07-1.13x at one queue but 0.63-0.90x at
/// 8-16. Where it could lose, one round stays.
pub fn round_limit(queues: usize, depth: usize) -> usize {
    let split = depth >= 128 || (depth >= 64 && queues <= 8);
    if split {
        depth.div_ceil(2)
    } else {
        depth.max(1)
    }
}

/// The queue times one request in this many for its latency histogram.
const LATENCY_SAMPLE: u64 = 16;

/// Collects one queue's requests and moves them through its store.
pub struct QueueEngine<Q: QueueStore> {
    store: Q,
    size: u64,
    batch: Vec<Request>,
    /// The most requests one store submission (one round) takes; a larger
    /// batch goes as several rounds, so the store can work on one while
    /// the next is built (see [`QueueEngine::with_max_round`]).
    max_round: usize,
    /// The round being split off `batch`.
    round: Vec<Request>,
    done: Vec<Completion>,
    stats: QueueStats,
    /// The device's counters and this queue's index in them.
    counters: Option<(Arc<DeviceCounters>, u16)>,
    /// Per tag: its op and length, and when it was enqueued if its
    /// latency is sampled (for the counters).
    started: Vec<(Option<Instant>, Op, u32)>,
}

/// Running totals for one queue; plain integers because only the queue's own
/// thread touches them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub submitted: u64,
    pub completed: u64,
    pub failed: u64,
    pub batches: u64,
    pub largest_batch: usize,
}

impl<Q: QueueStore> QueueEngine<Q> {
    pub fn new(store: Q, size: u64, depth: usize) -> Self {
        QueueEngine {
            store,
            size,
            batch: Vec::with_capacity(depth),
            max_round: usize::MAX,
            round: Vec::with_capacity(depth),
            done: Vec::with_capacity(depth),
            stats: QueueStats::default(),
            counters: None,
            started: Vec::new(),
        }
    }

    /// Hands the store at most `n` requests per round (at least 1): a
    /// full queue's batch then goes as several rounds in flight at once
    /// instead of one the store finishes before the next can start.
    pub fn with_max_round(mut self, n: usize) -> Self {
        self.max_round = n.max(1);
        self
    }

    /// Counts this queue's requests into `counters` (as queue `qid`).
    pub fn with_counters(mut self, counters: Arc<DeviceCounters>, qid: u16) -> Self {
        if counters.queue(qid).is_some() {
            self.started = vec![(None, Op::Flush, 0); self.batch.capacity().max(1)];
            self.counters = Some((counters, qid));
        }
        self
    }

    fn count(&self, c: &Completion) {
        let Some((counters, qid)) = &self.counters else {
            return;
        };
        let (Some(q), Some(&(t0, op, len))) =
            (counters.queue(*qid), self.started.get(c.tag as usize))
        else {
            return;
        };
        if let Some(t0) = t0 {
            q.record_latency(t0.elapsed());
        }
        if c.result < 0 {
            q.errors.fetch_add(1, Relaxed);
            return;
        }
        match op {
            Op::Read => {
                q.reads.fetch_add(1, Relaxed);
                q.read_bytes.fetch_add(len as u64, Relaxed);
            }
            Op::Write => {
                q.writes.fetch_add(1, Relaxed);
                q.write_bytes.fetch_add(len as u64, Relaxed);
            }
            _ => {
                q.others.fetch_add(1, Relaxed);
            }
        };
    }

    /// Queues a request for the next [`pump`](Self::pump). Requests outside
    /// the device or larger than their buffer fail with EINVAL here, so a
    /// store only ever sees valid ones.
    pub fn enqueue(&mut self, req: Request) {
        self.stats.submitted += 1;
        if let Some(slot) = self.started.get_mut(req.tag as usize) {
            // One request in LATENCY_SAMPLE is timed: enough for the
            // percentiles, and most requests skip the two clock reads.
            let timed = self.stats.submitted.is_multiple_of(LATENCY_SAMPLE);
            *slot = (timed.then(Instant::now), req.op, req.len);
        }
        if !self.fits(&req) {
            self.done.push(Completion {
                tag: req.tag,
                result: -libc::EINVAL,
            });
            return;
        }
        self.batch.push(req);
    }

    fn fits(&self, r: &Request) -> bool {
        let in_device = r
            .offset
            .checked_add(r.len as u64)
            .is_some_and(|end| end <= self.size);
        in_device && (!r.op.uses_buffer() || r.len as usize <= r.buf.len())
    }

    /// Sends the collected batch to the store, polls it, and hands every
    /// finished request to `complete`. Returns how many finished.
    pub fn pump(&mut self, mut complete: impl FnMut(Completion)) -> usize {
        while self.batch.len() > self.max_round {
            // The first max_round requests go now; the rest stay for the
            // next round, submitted in this same pump.
            self.round.extend(self.batch.drain(..self.max_round));
            self.stats.batches += 1;
            self.stats.largest_batch = self.stats.largest_batch.max(self.round.len());
            self.store.submit(&mut self.round, &mut self.done);
        }
        if !self.batch.is_empty() {
            self.stats.batches += 1;
            self.stats.largest_batch = self.stats.largest_batch.max(self.batch.len());
            self.store.submit(&mut self.batch, &mut self.done);
        }
        if self.store.in_flight() > 0 {
            self.store.poll(&mut self.done);
        }
        let n = self.done.len();
        for c in &self.done {
            self.count(c);
        }
        for c in self.done.drain(..) {
            self.stats.completed += 1;
            if c.result < 0 {
                self.stats.failed += 1;
            }
            complete(c);
        }
        n
    }

    /// Requests handed to the store and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.store.in_flight()
    }

    /// Whether a pump would do anything.
    pub fn has_work(&self) -> bool {
        !self.batch.is_empty() || !self.done.is_empty() || self.store.in_flight() > 0
    }

    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    pub fn store_mut(&mut self) -> &mut Q {
        &mut self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vramblk_store::{BufferRegion, Op};

    /// A store that finishes requests one poll later, to exercise the
    /// asynchronous path.
    #[derive(Default)]
    struct LaggingStore {
        pending: Vec<Request>,
        batches: Vec<usize>,
    }

    impl QueueStore for LaggingStore {
        fn submit(&mut self, batch: &mut Vec<Request>, _done: &mut Vec<Completion>) {
            self.batches.push(batch.len());
            self.pending.append(batch);
        }
        fn poll(&mut self, done: &mut Vec<Completion>) {
            done.extend(self.pending.drain(..).map(|r| Completion {
                tag: r.tag,
                result: r.len as i32,
            }));
        }
        fn in_flight(&self) -> usize {
            self.pending.len()
        }
    }

    /// Enqueues one 4 KiB `op` on each of tags 0..n, tag t at page t.
    fn enqueue_pages(e: &mut QueueEngine<LaggingStore>, bufs: &BufferRegion, op: Op, n: u16) {
        for tag in 0..n {
            e.enqueue(Request {
                tag,
                op,
                offset: tag as u64 * 4096,
                len: 4096,
                buf: bufs.slot(tag as usize).unwrap(),
            });
        }
    }

    #[test]
    fn one_round_is_one_batch() {
        let bufs = BufferRegion::new(8, 4096).unwrap();
        let mut e = QueueEngine::new(LaggingStore::default(), 1 << 20, 8);
        enqueue_pages(&mut e, &bufs, Op::Write, 8);
        let mut seen = Vec::new();
        e.pump(|c| seen.push(c.tag));
        assert_eq!(e.store_mut().batches, vec![8]);
        assert_eq!(seen.len(), 8, "lagging store completes on the first poll");
        assert!(!e.has_work());
        assert_eq!(e.stats().batches, 1);
        assert_eq!(e.stats().largest_batch, 8);
    }

    #[test]
    fn rounds_are_split_only_where_measured_to_help() {
        assert_eq!(round_limit(16, 128), 64);
        assert_eq!(round_limit(1, 128), 64);
        assert_eq!(round_limit(8, 64), 32);
        assert_eq!(round_limit(16, 64), 64, "16 queues of 64 keep one round");
        assert_eq!(round_limit(1, 32), 32, "rounds of 16 lose at many queues");
        assert_eq!(round_limit(1, 255), 128);
        assert_eq!(round_limit(4, 0), 1);
    }

    #[test]
    fn a_batch_larger_than_a_round_goes_as_several_rounds() {
        let bufs = BufferRegion::new(10, 4096).unwrap();
        let mut e = QueueEngine::new(LaggingStore::default(), 1 << 20, 10).with_max_round(4);
        enqueue_pages(&mut e, &bufs, Op::Read, 10);
        let mut seen = Vec::new();
        e.pump(|c| seen.push(c.tag));
        assert_eq!(e.store_mut().batches, vec![4, 4, 2], "in order, none lost");
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<u16>>());
        assert_eq!((e.stats().batches, e.stats().largest_batch), (3, 4));
        // Zero means one request a round, not none.
        let mut e = QueueEngine::new(LaggingStore::default(), 1 << 20, 2).with_max_round(0);
        enqueue_pages(&mut e, &bufs, Op::Read, 2);
        e.pump(|_| {});
        assert_eq!(e.store_mut().batches, vec![1, 1]);
    }

    #[test]
    fn invalid_requests_never_reach_the_store() {
        let bufs = BufferRegion::new(1, 4096).unwrap();
        let buf = bufs.slot(0).unwrap();
        let mut e = QueueEngine::new(LaggingStore::default(), 1 << 20, 4);
        e.enqueue(Request {
            tag: 1,
            op: Op::Read,
            offset: 1 << 20,
            len: 4096,
            buf,
        });
        e.enqueue(Request {
            tag: 2,
            op: Op::Write,
            offset: 0,
            len: 8192,
            buf,
        });
        e.enqueue(Request {
            tag: 3,
            op: Op::Discard,
            offset: 0,
            len: 1 << 20,
            buf,
        });
        let mut seen = Vec::new();
        e.pump(|c| seen.push(c));
        assert_eq!(e.store_mut().batches, vec![1], "only the discard is valid");
        seen.sort_by_key(|c| c.tag);
        assert_eq!(seen[0].result, -libc::EINVAL);
        assert_eq!(seen[1].result, -libc::EINVAL);
        assert_eq!(seen[2].result, 1 << 20);
        assert_eq!(e.stats().failed, 2);
    }
}
