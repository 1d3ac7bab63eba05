//! Where a queue round's time goes (issue 19): the CPU stages of a round in
//! `CudaQueue::submit` and `finish` (a compressed queue's in `PackedQueue`,
//! issue 18), and the GPU's part as the queue sees it. Off unless
//! [`enable`]d (engine-bench turns it on; a server never does, so its
//! queues read no clock and touch no shared counter). When on,
//! each queue times its rounds with a few clock reads (not per request)
//! and adds them to process-wide totals, which engine-bench reads between
//! its shapes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// The stages of a round, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Requests to pieces: extent lookup and pin, a first write's slot and
    /// its map record (waited for), reads of unmapped extents answered.
    Translate,
    /// Pieces to work: the kernel's descriptor table, the copy engines'
    /// copies, the checksums computed or fetched on the CPU side.
    Build,
    /// The kernel launch and the round's event.
    Launch,
    /// From the event's record to the poll that finds it complete: the
    /// GPU's work, plus how late the queue looks.
    Gpu,
    /// Completion bookkeeping: pins let go, checksum mismatches looked
    /// for, answers handed back.
    Finish,
    /// A compressed round's start: pending pages looked for, a read's
    /// pages looked up and their pool extents pinned, the job table, the
    /// launch.
    Lookup,
    /// A write round's compress launch, from its record to the poll that
    /// finds it done.
    Compress,
    /// A write round's blocks given slots, its entries, their launches.
    Place,
    /// Waiting for a lock of the compressed device's page map (inside
    /// the stages above, not beside them).
    MapWait,
    /// Waiting for the lock of its pool (inside the stages above).
    PoolWait,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Translate,
        Stage::Build,
        Stage::Launch,
        Stage::Gpu,
        Stage::Finish,
    ];

    /// A compressed queue's stages, in order ([`Stage::Gpu`]: a round's
    /// last trip to the GPU, the stores of a write round or a read's
    /// decompression), and the lock waits inside them.
    pub const PACKED: [Stage; 7] = [
        Stage::Lookup,
        Stage::Compress,
        Stage::Place,
        Stage::Gpu,
        Stage::Finish,
        Stage::MapWait,
        Stage::PoolWait,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Translate => "translate",
            Stage::Build => "build",
            Stage::Launch => "launch",
            Stage::Gpu => "gpu",
            Stage::Finish => "finish",
            Stage::Lookup => "lookup",
            Stage::Compress => "compress",
            Stage::Place => "place",
            Stage::MapWait => "map lock wait",
            Stage::PoolWait => "pool lock wait",
        }
    }
}

/// How many stages there are.
const STAGES: usize = 10;

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; STAGES] = [const { AtomicU64::new(0) }; STAGES];
static ROUNDS: AtomicU64 = AtomicU64::new(0);
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Times every queue's rounds from now on, in this process.
pub fn enable() {
    ENABLED.store(true, Relaxed);
}

/// A round's start: now when timing is on, else None (and every
/// [`lap`] from it does nothing).
pub(crate) fn start() -> Option<Instant> {
    ENABLED.load(Relaxed).then(Instant::now)
}

/// Adds the time since `since` to `stage`; returns now, the next stage's
/// start (None when `since` is: timing is off).
pub(crate) fn lap(stage: Stage, since: Option<Instant>) -> Option<Instant> {
    let since = since?;
    let now = Instant::now();
    let ns = u64::try_from(now.duration_since(since).as_nanos()).unwrap_or(u64::MAX);
    NANOS[stage as usize].fetch_add(ns, Relaxed);
    Some(now)
}

/// Counts a round of `requests` that reached the GPU, when timing is on.
pub(crate) fn count_round(requests: usize) {
    if ENABLED.load(Relaxed) {
        ROUNDS.fetch_add(1, Relaxed);
        REQUESTS.fetch_add(requests as u64, Relaxed);
    }
}

/// What every queue of this process spent, per stage, since the last
/// [`StageTotals::take`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageTotals {
    pub nanos: [u64; STAGES],
    pub rounds: u64,
    pub requests: u64,
}

impl StageTotals {
    /// The totals so far, which start again from zero.
    pub fn take() -> StageTotals {
        let mut t = StageTotals::default();
        for (n, a) in t.nanos.iter_mut().zip(&NANOS) {
            *n = a.swap(0, Relaxed);
        }
        t.rounds = ROUNDS.swap(0, Relaxed);
        t.requests = REQUESTS.swap(0, Relaxed);
        t
    }

    /// Mean microseconds per round in `stage` (0 without rounds).
    pub fn us_per_round(&self, stage: Stage) -> f64 {
        if self.rounds == 0 {
            return 0.0;
        }
        self.nanos[stage as usize] as f64 / 1e3 / self.rounds as f64
    }

    /// Mean requests per round.
    pub fn requests_per_round(&self) -> f64 {
        if self.rounds == 0 {
            return 0.0;
        }
        self.requests as f64 / self.rounds as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_lap_from_no_start_does_nothing() {
        assert_eq!(lap(Stage::Build, None), None);
    }

    #[test]
    fn laps_add_up_per_stage_and_take_starts_again() {
        enable();
        assert!(start().is_some(), "timing is on once enabled");
        // Other tests of this crate run rounds too: start from what they
        // left and look only at what this test adds.
        let _ = StageTotals::take();
        let t0 = Instant::now() - Duration::from_micros(30);
        let t1 = lap(Stage::Translate, Some(t0)).expect("a lap from a start");
        assert!(t1 >= t0);
        let before_gpu = t1 - Duration::from_micros(20);
        lap(Stage::Gpu, Some(before_gpu));
        count_round(8);
        let t = StageTotals::take();
        assert!(t.nanos[Stage::Translate as usize] >= 30_000);
        assert!(t.nanos[Stage::Gpu as usize] >= 20_000);
        assert_eq!(t.nanos[Stage::Launch as usize], 0);
        assert_eq!(t.rounds, 1);
        assert_eq!(t.requests_per_round(), 8.0);
        assert!(t.us_per_round(Stage::Translate) >= 30.0);
        assert_eq!(StageTotals::take().rounds, 0);
    }
}
