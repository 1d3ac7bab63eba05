//! VRAM store on the CUDA driver API (cudarc, libcuda loaded at run time,
//! so this crate builds and its non-GPU tests run without CUDA).
//!
//! Memory: `cuMemCreate` chunks with the POSIX-fd handle type, mapped into
//! one reserved range, each exported as an fd ([`Store::backing_fds`]), so
//! the VRAM can outlive the serving process. Data path (copy-engine mode):
//! per queue one stream; the queue's io buffers are pinned once at queue
//! start; each round's requests are issued as async copies on that stream
//! followed by one event, which the queue polls.

mod driver;
mod queue;
mod store;

pub use queue::CudaQueue;
pub use store::{CudaStore, CudaStoreOptions};

/// Step in which the allocation backs off when VRAM is short.
pub const BACKOFF_STEP: u64 = 512 << 20;
