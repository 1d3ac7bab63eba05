//! Queue threads started before they are needed, and the start of a
//! device's queues on them.
//!
//! A standby server takes over while memory may be exhausted: swap waits
//! on the device, and every allocation of a server (an I/O flusher) waits
//! until a page is free, which nothing frees while the device has no
//! server (the kernel's OOM killer does not act for such allocations).
//! Starting a thread then (its kernel stack, its signal stack) or a ring
//! (the kernel's ring pages) is what can wait for good: a 7.3 run once hung
//! so, a new queue thread's signal stack waiting in the page allocator. So
//! a standby starts its device's queue threads, each with its queue ring
//! built, while memory is plentiful; each parks until it is handed its
//! queue. A server that was no standby starts them as it goes, as libublk
//! would.

use libublk::ctrl::UblkCtrl;
use libublk::io::{ublk_init_task_ring, UblkDev};
use libublk::UblkError;
use std::cell::RefCell;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

/// What a parked thread is told.
enum Word {
    Wait,
    Run(Job),
    Leave,
}

/// Where one parked thread waits for its word.
struct Parking {
    word: Mutex<Word>,
    told: Condvar,
}

impl Parking {
    fn tell(&self, word: Word) {
        *self.word.lock().unwrap_or_else(|p| p.into_inner()) = word;
        self.told.notify_one();
    }

    fn wait(&self) -> Word {
        let mut w = self.word.lock().unwrap_or_else(|p| p.into_inner());
        while matches!(*w, Word::Wait) {
            w = self.told.wait(w).unwrap_or_else(|p| p.into_inner());
        }
        std::mem::replace(&mut *w, Word::Wait)
    }
}

/// What a server readied for its device's queues before serving it.
#[derive(Default)]
pub struct QueuePrep {
    /// Queue threads a standby started in advance; None: started as needed.
    pub threads: Option<QueueThreads>,
    /// Runs right before the queues start (a taking-over server frees the
    /// memory it set aside for them there: freed earlier, while it waits
    /// for the kernel, other processes would take it).
    pub before_start: Option<Box<dyn FnOnce()>>,
    /// The control a standby built for recovering the device while the
    /// device was still served ([`crate::take_over::prepare_recovery`]).
    pub recovery: Option<crate::take_over::PreparedRecovery>,
}

/// Threads parked with their queue rings built, for a device whose queues
/// have `depth` tags.
pub struct QueueThreads {
    depth: u16,
    parked: Vec<(Arc<Parking>, JoinHandle<()>)>,
}

impl QueueThreads {
    /// Starts `count` threads, each with a queue ring for `depth` tags
    /// built as libublk builds it; fails if a thread or a ring cannot be
    /// made (the threads made so far leave).
    pub fn start(count: u16, depth: u16) -> std::io::Result<QueueThreads> {
        let mut threads = QueueThreads {
            depth,
            parked: Vec::with_capacity(count.into()),
        };
        for _ in 0..count {
            let parking = Arc::new(Parking {
                word: Mutex::new(Word::Wait),
                told: Condvar::new(),
            });
            let (built_tx, built) = mpsc::channel();
            let p = parking.clone();
            let handle = std::thread::Builder::new()
                .name("vramblk-queue".into())
                .spawn(move || {
                    let ring = build_queue_ring(depth);
                    let ok = ring.is_ok();
                    let _ = built_tx.send(ring);
                    if !ok {
                        return;
                    }
                    if let Word::Run(job) = p.wait() {
                        job();
                    }
                })?;
            match built.recv() {
                Ok(Ok(())) => threads.parked.push((parking, handle)),
                Ok(Err(e)) => {
                    let _ = handle.join();
                    return Err(e);
                }
                Err(_) => {
                    let _ = handle.join();
                    return Err(std::io::Error::other(
                        "a queue thread ended before its ring",
                    ));
                }
            }
        }
        Ok(threads)
    }

    /// Threads still parked.
    pub fn len(&self) -> usize {
        self.parked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parked.is_empty()
    }

    /// Hands `job` to a parked thread; gives it back if none is left.
    fn run(&mut self, job: Job) -> Result<JoinHandle<()>, Job> {
        match self.parked.pop() {
            Some((parking, handle)) => {
                parking.tell(Word::Run(job));
                Ok(handle)
            }
            None => Err(job),
        }
    }
}

impl Drop for QueueThreads {
    fn drop(&mut self) {
        for (parking, handle) in self.parked.drain(..) {
            parking.tell(Word::Leave);
            let _ = handle.join();
        }
    }
}

/// This thread's queue ring, as libublk's `UblkQueue::new` builds it for a
/// device of `depth` tags (it takes a ring already built as it is).
fn build_queue_ring(depth: u16) -> std::io::Result<()> {
    ublk_init_task_ring(|cell| {
        if cell.get().is_none() {
            let ring = io_uring::IoUring::builder()
                .setup_cqsize(depth.into())
                .setup_coop_taskrun()
                .build(depth.into())
                .map_err(UblkError::IOError)?;
            cell.set(RefCell::new(ring))
                .map_err(|_| UblkError::OtherError(-libc::EEXIST))?;
        }
        Ok(())
    })
    .map_err(|e| std::io::Error::other(format!("building a queue ring: {e}")))
}

/// Starts a thread per queue of `dev` running `q_fn`, on the parked
/// `threads` where they fit the device (its depth) and on new threads
/// otherwise; then, from this thread, sets each one's CPUs and tells libublk
/// its id, as libublk's own `run_target` does.
pub(crate) fn start_queues<Q>(
    ctrl: &UblkCtrl,
    dev: &Arc<UblkDev>,
    q_fn: Q,
    mut threads: Option<QueueThreads>,
) -> Vec<JoinHandle<()>>
where
    Q: FnOnce(u16, &UblkDev) + Send + Sync + Clone + 'static,
{
    if threads
        .as_ref()
        .is_some_and(|t| t.depth != dev.dev_info.queue_depth)
    {
        log::warn!("the queue threads made ready were for another queue depth; starting new ones");
        threads = None;
    }
    let queues = dev.dev_info.nr_hw_queues;
    // libublk can serve a queue's tags from several threads (vramblk asks
    // for one); each is told its index, as libublk's run_target does.
    let per_queue = dev.io_threads_per_queue().max(1);
    let (tid_tx, tids) = mpsc::channel();
    let mut handles = Vec::with_capacity(usize::from(queues) * usize::from(per_queue));
    let mut started_anew = 0;
    for (qid, idx) in (0..queues).flat_map(|q| (0..per_queue).map(move |i| (q, i))) {
        let (dev, tid_tx, q_fn) = (dev.clone(), tid_tx.clone(), q_fn.clone());
        let job: Job = Box::new(move || {
            let tid = UblkCtrl::init_queue_thread();
            libublk::io::set_io_thread_idx(idx);
            if tid_tx.send((qid, tid)).is_ok() {
                q_fn(qid, &dev);
            }
        });
        let handed = match threads.as_mut() {
            Some(t) => t.run(job),
            None => Err(job),
        };
        match handed {
            Ok(h) => handles.push(h),
            Err(job) => match std::thread::Builder::new()
                .name("vramblk-queue".into())
                .spawn(job)
            {
                Ok(h) => {
                    started_anew += 1;
                    handles.push(h)
                }
                Err(e) => log::error!("queue {qid}: no thread for it ({e})"),
            },
        }
    }
    if started_anew > 0 && threads.is_some() {
        log::warn!("{started_anew} queue thread(s) started now: fewer were made ready");
    }
    // Parked threads left over (a device with fewer queues) leave here.
    drop(threads);
    drop(tid_tx);
    for (qid, tid) in tids.iter().take(handles.len()) {
        ctrl.set_thread_affinity(qid, tid);
        if let Err(e) = ctrl.configure_queue(dev, qid, tid) {
            log::warn!("queue {qid}: libublk could not record its thread ({e})");
        }
    }
    handles
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads of this process named as queue threads.
    fn queue_threads_alive() -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "vramblk-queue")
            })
            .count()
    }

    #[test]
    fn parked_threads_run_what_they_are_handed_and_leave_when_dropped() {
        let mut threads = QueueThreads::start(2, 32).expect("two queue threads");
        assert_eq!(threads.len(), 2);
        let (tx, rx) = mpsc::channel();
        let mut handles = Vec::new();
        for i in 0..2 {
            let tx = tx.clone();
            let job: Job = Box::new(move || {
                // The ring was built before the job came.
                let entries = libublk::io::with_task_io_ring_mut(|ring| ring.params().sq_entries());
                tx.send((i, entries, std::thread::current().id())).unwrap();
            });
            handles.push(threads.run(job).ok().expect("a parked thread"));
        }
        assert!(threads.is_empty());
        assert!(
            threads.run(Box::new(|| {})).is_err(),
            "no third thread to hand a job to"
        );
        for h in handles {
            h.join().unwrap();
        }
        let mut got: Vec<_> = rx.try_iter().collect();
        got.sort_by_key(|g| g.0);
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|g| g.1 == 32), "{got:?}");
        assert_ne!(got[0].2, got[1].2, "one thread each");
        assert_ne!(got[0].2, std::thread::current().id());
        assert_eq!(queue_threads_alive(), 0, "threads that ran their job ended");

        // Never handed anything: they leave when the set is dropped.
        let unused = QueueThreads::start(3, 16).expect("three queue threads");
        assert_eq!(queue_threads_alive(), 3);
        drop(unused);
        assert_eq!(queue_threads_alive(), 0);
    }
}
