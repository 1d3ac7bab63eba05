//! Per-queue batching: requests collected during one round go to the store
//! in one `submit`; completions come back from `poll`.

use crate::counters::DeviceCounters;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;
use vramblk_store::{Completion, Op, QueueStore, Request};

/// The queue times one request in this many for its latency histogram.
const LATENCY_SAMPLE: u64 = 16;

/// Collects one queue's requests and moves them through its store.
pub struct QueueEngine<Q: QueueStore> {
    store: Q,
    size: u64,
    batch: Vec<Request>,
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
            done: Vec::with_capacity(depth),
            stats: QueueStats::default(),
            counters: None,
            started: Vec::new(),
        }
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

    #[test]
    fn one_round_is_one_batch() {
        let bufs = BufferRegion::new(8, 4096).unwrap();
        let mut e = QueueEngine::new(LaggingStore::default(), 1 << 20, 8);
        for tag in 0..8u16 {
            e.enqueue(Request {
                tag,
                op: Op::Write,
                offset: tag as u64 * 4096,
                len: 4096,
                buf: bufs.slot(tag as usize).unwrap(),
            });
        }
        let mut seen = Vec::new();
        e.pump(|c| seen.push(c.tag));
        assert_eq!(e.store_mut().batches, vec![8]);
        assert_eq!(seen.len(), 8, "lagging store completes on the first poll");
        assert!(!e.has_work());
        assert_eq!(e.stats().batches, 1);
        assert_eq!(e.stats().largest_batch, 8);
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
