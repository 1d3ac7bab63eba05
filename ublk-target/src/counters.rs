//! Per-queue counters, kept by each queue's own thread with relaxed atomic
//! adds (no locks on the hot path) and read by anyone: requests, bytes,
//! errors and a latency histogram (enqueue to completion, as the queue sees
//! it).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Histogram buckets: 4 per power of two of microseconds, from 1 us up to
/// 2^24 us (16 s); the last bucket takes everything slower. Percentiles
/// read from it are within ~19% (one sub-bucket).
const SUB: usize = 4;
const OCTAVES: usize = 24;
const BUCKETS: usize = SUB * OCTAVES + 1;

#[derive(Debug)]
pub struct QueueCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Flushes, discards, write-zeroes.
    pub others: AtomicU64,
    pub errors: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

impl Default for QueueCounters {
    fn default() -> Self {
        QueueCounters {
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
            others: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// The bucket of a latency in microseconds.
fn bucket(us: u64) -> usize {
    if us < 1 {
        return 0;
    }
    let octave = 63 - us.leading_zeros() as usize;
    if octave >= OCTAVES {
        return BUCKETS - 1;
    }
    // The two bits after the leading one pick the quarter of the octave.
    let frac = if octave >= 2 {
        ((us >> (octave - 2)) & 3) as usize
    } else {
        ((us << (2 - octave)) & 3) as usize
    };
    octave * SUB + frac
}

/// The smallest latency (us) a bucket holds.
fn bucket_floor(b: usize) -> f64 {
    if b >= BUCKETS - 1 {
        return (1u64 << OCTAVES) as f64;
    }
    let (octave, frac) = (b / SUB, b % SUB);
    (1u64 << octave) as f64 * (1.0 + frac as f64 / SUB as f64)
}

impl QueueCounters {
    pub fn record_latency(&self, d: Duration) {
        self.latency[bucket(d.as_micros() as u64)].fetch_add(1, Relaxed);
    }

    fn add_into(&self, s: &mut CounterSnapshot, hist: &mut [u64; BUCKETS]) {
        s.reads += self.reads.load(Relaxed);
        s.writes += self.writes.load(Relaxed);
        s.read_bytes += self.read_bytes.load(Relaxed);
        s.write_bytes += self.write_bytes.load(Relaxed);
        s.others += self.others.load(Relaxed);
        s.errors += self.errors.load(Relaxed);
        for (h, b) in hist.iter_mut().zip(&self.latency) {
            *h += b.load(Relaxed);
        }
    }
}

/// Every queue's counters of one device.
#[derive(Debug)]
pub struct DeviceCounters {
    queues: Vec<QueueCounters>,
}

/// Totals over a device's queues, with latency percentiles (us; `null`
/// before the first request).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CounterSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub others: u64,
    pub errors: u64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
}

impl DeviceCounters {
    pub fn new(queues: u16) -> DeviceCounters {
        DeviceCounters {
            queues: (0..queues).map(|_| QueueCounters::default()).collect(),
        }
    }

    pub fn queue(&self, qid: u16) -> Option<&QueueCounters> {
        self.queues.get(qid as usize)
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        let mut s = CounterSnapshot::default();
        let mut hist = [0u64; BUCKETS];
        for q in &self.queues {
            q.add_into(&mut s, &mut hist);
        }
        s.p50_us = percentile(&hist, 0.50);
        s.p99_us = percentile(&hist, 0.99);
        s
    }
}

fn percentile(hist: &[u64; BUCKETS], p: f64) -> Option<f64> {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64 * p).ceil() as u64).max(1);
    let mut seen = 0;
    for (b, n) in hist.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(bucket_floor(b));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_floors_fit() {
        let mut last = 0;
        for us in 1..100_000u64 {
            let b = bucket(us);
            assert!(b >= last, "{us}");
            assert!(bucket_floor(b) <= us as f64, "{us}");
            assert!(us as f64 <= bucket_floor(b) * 1.25 + 1.0, "{us}");
            last = b;
        }
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn percentiles_over_queues() {
        let c = DeviceCounters::new(2);
        assert_eq!(c.snapshot().p50_us, None);
        let q0 = c.queue(0).unwrap();
        let q1 = c.queue(1).unwrap();
        for _ in 0..98 {
            q0.record_latency(Duration::from_micros(10));
        }
        q1.record_latency(Duration::from_micros(1000));
        q1.record_latency(Duration::from_micros(1000));
        q0.reads.fetch_add(3, Relaxed);
        q1.reads.fetch_add(4, Relaxed);
        let s = c.snapshot();
        assert_eq!(s.reads, 7);
        assert_eq!(s.p50_us, Some(10.0));
        assert_eq!(s.p99_us, Some(896.0));
        assert!(c.queue(2).is_none());
    }
}
