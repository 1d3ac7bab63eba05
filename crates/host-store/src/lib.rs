//! Host-RAM store: the device's bytes live in a memfd mapped shared.
//!
//! With `hugetlb` the memfd takes 2 MiB huge pages from the pool reserved at
//! boot (`hugepages=N`). That pool sits outside the memory that ordinary
//! allocations and reclaim draw on, as VRAM does, so swapping to it relieves
//! real pressure; a plain memfd is the very RAM that is short.

mod memfd;
mod meminfo;

pub use memfd::{HostStore, HostStoreOptions};
pub use meminfo::MemInfo;

#[cfg(test)]
mod tests;
