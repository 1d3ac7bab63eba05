//! Counts the heap allocations a thread makes while it is "armed", for the
//! checks that a queue allocates nothing once it serves (a swap device's
//! server is asked for pages while memory is short, when an allocation may
//! wait for memory only its own device can free): engine-bench arms the
//! CUDA store's queues around submit and poll ([`Armed`]), ublk-target's
//! test the whole queue engine over the host store ([`armed`]). A binary
//! makes [`Counting`] its global allocator to use either.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use vramblk_store::{Completion, QueueStore, Request};

/// The system allocator, counting what armed threads ask of it.
pub struct Counting;

static COUNTED: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
}

fn note() {
    // try_with: a thread being torn down has no slot (never armed then).
    if ARMED.try_with(Cell::get).unwrap_or(false) {
        COUNTED.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: as the caller promises.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: as the caller promises.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: as the caller promises.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as the caller promises.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Allocations armed threads have made so far.
pub fn counted() -> u64 {
    COUNTED.load(Ordering::Relaxed)
}

/// A queue whose submit and poll run armed.
pub struct Armed<Q>(pub Q);

/// Runs `f` armed: what this thread allocates in it is counted.
pub fn armed<T>(f: impl FnOnce() -> T) -> T {
    ARMED.with(|a| a.set(true));
    let out = f();
    ARMED.with(|a| a.set(false));
    out
}

impl<Q: QueueStore> QueueStore for Armed<Q> {
    fn submit(&mut self, batch: &mut Vec<Request>, done: &mut Vec<Completion>) {
        armed(|| self.0.submit(batch, done));
    }

    fn poll(&mut self, done: &mut Vec<Completion>) {
        armed(|| self.0.poll(done));
    }

    fn in_flight(&self) -> usize {
        self.0.in_flight()
    }
}
