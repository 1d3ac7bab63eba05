//! How a queue waits while its store has requests in flight: spin (poll
//! the store again at once) for a while after the last progress, then nap
//! between polls so a stalled GPU does not keep a core busy. The queue loop
//! naps in io_uring (where new requests also wake it); engine-bench, which
//! has no ublk, applies the same policy with a sleep to measure what it
//! costs and saves (docs/benchmarks.md).

use std::time::Duration;

/// What to do before polling the store again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Poll again now.
    Spin,
    /// Nap this long first.
    Nap(Duration),
}

/// A spin-then-nap policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollPolicy {
    /// How long after the last progress the queue keeps spinning.
    pub spin: Duration,
    /// How long each nap lasts once it stopped spinning.
    pub nap: Duration,
}

impl PollPolicy {
    /// The queue loop's policy: spin 50 us after the last progress (a
    /// 4 KiB round on the GPU takes 7-20 us, so a lone request is answered
    /// without a nap), then nap 20 us at a time.
    pub const SERVER: PollPolicy = PollPolicy {
        spin: Duration::from_micros(50),
        nap: Duration::from_micros(20),
    };

    /// Never nap (engine-bench's load loop before the policy was measured).
    pub const SPIN_ONLY: PollPolicy = PollPolicy {
        spin: Duration::MAX,
        nap: Duration::ZERO,
    };

    /// What to do with requests in flight, `since_progress` after the
    /// store last finished one.
    pub fn wait(&self, since_progress: Duration) -> Wait {
        if since_progress > self.spin {
            Wait::Nap(self.nap)
        } else {
            Wait::Spin
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spins_after_progress_then_naps() {
        let p = PollPolicy::SERVER;
        assert_eq!(p.wait(Duration::from_micros(10)), Wait::Spin);
        assert_eq!(p.wait(Duration::from_micros(50)), Wait::Spin);
        assert_eq!(
            p.wait(Duration::from_micros(51)),
            Wait::Nap(Duration::from_micros(20))
        );
        assert_eq!(
            PollPolicy::SPIN_ONLY.wait(Duration::from_secs(60)),
            Wait::Spin
        );
    }
}
