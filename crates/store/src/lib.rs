//! The store interface: what a vramblk queue hands its backend.
//!
//! A queue collects every request the kernel gave it in one round and hands
//! them to its [`QueueStore`] in one [`QueueStore::submit`] call, then finds
//! finished ones with [`QueueStore::poll`] from its own loop. Batching is the
//! point: on a GPU one gather/scatter per round is 10-30x cheaper than one
//! copy call per request (docs/design.md), and a synchronous backend simply
//! completes everything inside `submit`.
//!
//! The memory behind a store is an object referenced by file descriptors
//! (see [`Store::backing_layout`]): a memfd for host RAM, exported CUDA
//! allocations for VRAM. Whoever holds those fds keeps the data alive, which is what lets
//! a restarted daemon recover a device with its contents.

mod buffers;
mod error;
pub mod handoff;
mod request;

pub use buffers::{BufferRegion, IoBuf};
pub use error::StoreError;
pub use request::{Completion, Op, Request};

/// A block store: fixed size, byte addressed, shared by every queue.
pub trait Store: Send + Sync + 'static {
    /// The per-queue handle; lives on that queue's thread only.
    type Queue: QueueStore;

    /// Usable size in bytes.
    fn size(&self) -> u64;

    /// One line for logs and `vramblk list`, e.g. "host memfd (hugetlb)".
    fn describe(&self) -> String;

    /// Opens the handle for queue `qid`. `buffers` are that queue's io
    /// buffers; a store may register them (pin, map) once here, never per
    /// request.
    fn open_queue(&self, qid: u16, buffers: &BufferRegion) -> Result<Self::Queue, StoreError>;

    /// The length in bytes of what each file descriptor that keeps the
    /// data alive holds, in order (what a restarted server needs to map
    /// them again). The fds themselves come from each store's own method,
    /// as their number may change while a store lives.
    fn backing_layout(&self) -> Vec<u64> {
        vec![self.size()]
    }

    /// Whether the store keeps a checksum of every page and checks it on
    /// every read (the layout a restarted server must be told).
    fn integrity(&self) -> bool {
        false
    }
}

/// One queue's view of a store. Not shared between threads.
pub trait QueueStore {
    /// Takes every request in `batch` (leaving it empty). Requests the store
    /// finishes at once are pushed to `done`; the rest are found by `poll`.
    /// Requests are already bounds-checked against [`Store::size`] and their
    /// buffer.
    fn submit(&mut self, batch: &mut Vec<Request>, done: &mut Vec<Completion>);

    /// Pushes finished requests to `done`. Never blocks.
    fn poll(&mut self, done: &mut Vec<Completion>);

    /// Requests submitted and not yet returned by `poll`.
    fn in_flight(&self) -> usize;
}
