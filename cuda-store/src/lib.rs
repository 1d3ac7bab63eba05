//! VRAM store on the CUDA driver API (cudarc, libcuda loaded at run time,
//! so this crate builds and its non-GPU tests run without CUDA).
//!
//! Memory: `cuMemCreate` chunks with the POSIX-fd handle type, mapped into
//! one reserved range, each exported as an fd
//! ([`CudaStore::exported_chunks`]), so the VRAM can outlive the serving
//! process. Data path: per queue one stream; the queue's io buffers are
//! pinned and device-mapped once at queue start; a round of 4 or more
//! requests goes out as one launch of a copy kernel (the SMs read and write
//! the mapped buffers), fewer (and all in dma mode) as async copies on the
//! copy engines, all followed by one event, which the queue polls. With
//! integrity on, every page carries a CRC32C checked on every read
//! (integrity.rs).

pub mod ceiling;
mod deferred;
mod driver;
mod extents;
mod integrity;
mod kernel;
mod packed;
pub mod page_kernels;
mod pinned;
pub mod probe;
mod queue;
pub mod stages;
mod store;
mod warm;

pub use driver::CONTEXT_LOST_EXIT;
pub use extents::EXTENT;
pub use integrity::{page_sum, PAGE};
pub use packed::{Compress, PackedUsage};
pub use pinned::pinned_tables_made;
pub use queue::CudaQueue;
pub use store::give_back::Resized;
pub use store::{CudaStore, CudaStoreOptions, StoreQueue};

/// Step in which the allocation backs off when VRAM is short.
pub const BACKOFF_STEP: u64 = 512 << 20;

/// Which requests of a queue round go through the copy kernel; the rest use
/// the copy engines (one async copy each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyPolicy {
    /// Largest request the kernel moves; 0: copy engines only.
    pub kernel_max: u32,
    /// Fewest kernel-eligible requests in a round for a launch: below
    /// that, the copy engines answer sooner (one 4 KiB copy: 7-8 us; a
    /// launch reading mapped memory: 11-12 us on the H100).
    pub kernel_min_batch: usize,
}

impl CopyPolicy {
    /// `--copy-mode auto`: the kernel for every request size (on the H100
    /// it beat the copy engines at 4 KiB by 5-20x, at 128 KiB 45 vs 23-28
    /// GB/s and at 512 KiB 44-50 vs 38-44 GB/s; docs/benchmarks.md), in
    /// rounds of 4 requests or more.
    pub const AUTO: CopyPolicy = CopyPolicy {
        kernel_max: u32::MAX,
        kernel_min_batch: 4,
    };
    /// `--copy-mode dma`: copy engines only, no SM time taken from other
    /// GPU work.
    pub const DMA: CopyPolicy = CopyPolicy {
        kernel_max: 0,
        kernel_min_batch: usize::MAX,
    };

    pub fn uses_kernel(&self) -> bool {
        self.kernel_max > 0
    }
}
