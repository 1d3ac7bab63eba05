//! Every queue of a server starts fetching at once, or none does.
//!
//! A recovering server tells the kernel START_USER_RECOVERY, then each of
//! its queues submits a FETCH command per tag; the kernel counts a queue
//! ready once all of its tags fetched. On kernels before ublk's recovery
//! rework (Debian's 6.12 among them), a server that dies inside that window
//! strands the device: with no queue ready the next START_USER_RECOVERY
//! fails with EINVAL and the dead server's mappings are the only ones the
//! kernel accepts (stranded.rs frees it by fetching every tag unmapped,
//! which needs no tag of it fetched), and with some queues ready but not
//! all it dereferences a NULL task in the kernel (an oops that holds the
//! device's lock forever: every later command on it, and its I/O, hang).
//! So each queue prepares
//! everything first (its ring and command buffer, its store handle, its tag
//! tasks), waits here for the others, and they submit their FETCH commands
//! together; if any queue could not get ready, none fetches and the server
//! fails with the device still where the kernel can recover it.

use std::sync::{Condvar, Mutex};

/// Where the queues of one server meet before fetching.
pub(crate) struct StartGate {
    queues: usize,
    state: Mutex<Arrivals>,
    all_in: Condvar,
}

#[derive(Default)]
struct Arrivals {
    arrived: usize,
    failed: bool,
}

impl StartGate {
    pub(crate) fn new(queues: usize) -> StartGate {
        StartGate {
            queues,
            state: Mutex::new(Arrivals::default()),
            all_in: Condvar::new(),
        }
    }

    /// Arrives, `ready` or not, and waits for every other queue; true when
    /// all of them arrived ready (this queue may fetch).
    pub(crate) fn arrive(&self, ready: bool) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.arrived += 1;
        s.failed |= !ready;
        if s.arrived >= self.queues {
            self.all_in.notify_all();
        }
        while s.arrived < self.queues {
            s = self.all_in.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        !s.failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn nobody_passes_before_the_last_queue_arrives() {
        let gate = Arc::new(StartGate::new(4));
        let passed = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (gate, passed) = (gate.clone(), passed.clone());
                std::thread::spawn(move || {
                    let go = gate.arrive(true);
                    passed.fetch_add(1, Ordering::SeqCst);
                    go
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(passed.load(Ordering::SeqCst), 0, "three of four arrived");
        assert!(gate.arrive(true));
        assert!(threads.into_iter().all(|t| t.join().unwrap()));
    }

    #[test]
    fn one_queue_that_cannot_start_stops_them_all() {
        let gate = Arc::new(StartGate::new(3));
        let threads: Vec<_> = [true, false]
            .into_iter()
            .map(|ready| {
                let gate = gate.clone();
                std::thread::spawn(move || gate.arrive(ready))
            })
            .collect();
        assert!(!gate.arrive(true));
        assert!(threads.into_iter().all(|t| !t.join().unwrap()));
    }

    #[test]
    fn a_single_queue_passes_alone() {
        assert!(StartGate::new(1).arrive(true));
        assert!(!StartGate::new(1).arrive(false));
    }
}
