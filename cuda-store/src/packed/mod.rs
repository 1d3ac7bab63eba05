//! Compressed devices (issue 18): every 4 KiB page is kept as what it
//! holds (vramblk-compress's format): a same-filled page as its word in
//! the page map alone, a page that shrinks as an LZ4 block in a slot of
//! its size class, any other page whole. The GPU compresses each write
//! round's pages (the page kernels) and decompresses reads straight into
//! the io buffers.
//!
//! Layout in VRAM: slot 0 holds the extent map as for any device, but its
//! extents are pool extents (2 MiB each cut into slots of one class,
//! pool.rs), so VRAM is taken only as blocks need it and giving VRAM back
//! moves pool extents as it moves a plain device's extents. The slots
//! after it hold the page map (entry.rs: 16 bytes a page), written after
//! the block it names has landed, so a server that recovers after a
//! SIGKILL finds every page whose write was answered, and rebuilds the
//! pool from it (state.rs). A give-back first compacts the pool
//! (compact.rs): blocks of sparse pool extents move into the free slots of
//! full ones, so the sparse ones give their VRAM back.

mod compact;
mod entry;
mod pool;
mod queue;
mod state;

pub(crate) use compact::compact;
pub(crate) use queue::PackedPath;
pub use queue::PackedQueue;
pub use state::PackedUsage;

use crate::extents::{slot_addr, EXTENT, MAP_SLOT};
use entry::{ENTRY_BYTES, POOL_CLASSES};
use state::State;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use vramblk_compress::PAGE;

/// VRAM a compressed device leaves free beyond its reserve for its
/// queues' stagings: room for the first 2 MiB staging of 32 queues (a
/// queue makes its second where the free VRAM has room; 128 MiB here
/// refused a 512 MiB device on the stand-in's 600 MiB, 2026-12-04).
pub(crate) const STAGING_ROOM: u64 = 64 << 20;

/// How a device keeps its pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Compress {
    /// Every page whole in its extent (a plain device).
    #[default]
    Off,
    /// Same-filled pages as their word alone, the rest whole.
    Same,
    /// Same-filled pages as their word, the rest as LZ4 blocks where they
    /// shrink.
    Lz,
}

impl Compress {
    pub fn is_on(self) -> bool {
        self != Compress::Off
    }
}

/// Pool extents of a compressed device of `size` bytes: enough for every
/// page raw, plus one partly filled extent per class.
pub(crate) fn pool_extents(size: u64) -> u32 {
    size.div_ceil(EXTENT) as u32 + POOL_CLASSES as u32
}

/// Slots the page map of a device of `size` bytes takes (after the
/// extent map's).
pub(crate) fn page_map_slots(size: u64) -> u32 {
    (size.div_ceil(PAGE as u64) * ENTRY_BYTES).div_ceil(EXTENT) as u32
}

/// Where page `page`'s entry lives in VRAM mapped at `base`.
pub(crate) fn page_map_addr(base: u64, page: u64) -> u64 {
    slot_addr(base, MAP_SLOT + 1) + page * ENTRY_BYTES
}

/// What the queues of one compressed device share.
pub(crate) struct Packed {
    pub(crate) mode: Compress,
    /// Entries carry their page's checksum, checked on every read.
    pub(crate) integrity: bool,
    /// The page map's host copy, the pool and the freed slots (their
    /// locks inside: state.rs).
    pub(crate) state: State,
    /// The log said the VRAM held is nearly full (said again once it is
    /// not).
    nearly_full: AtomicBool,
}

impl Packed {
    /// A fresh device of `size` bytes: every page unwritten.
    pub(crate) fn new(size: u64, mode: Compress, integrity: bool) -> Packed {
        Packed {
            mode,
            integrity,
            state: State::new(size.div_ceil(PAGE as u64), pool_extents(size)),
            nearly_full: AtomicBool::new(false),
        }
    }

    /// The state rebuilt from a page map read back from VRAM (`raw`, an
    /// entry per page); `mapped` says which pool extents hold VRAM.
    pub(crate) fn rebuilt(
        size: u64,
        mode: Compress,
        integrity: bool,
        raw: Vec<[u64; 2]>,
        mapped: impl Fn(u32) -> bool,
    ) -> Result<Packed, String> {
        Ok(Packed {
            mode,
            integrity,
            state: State::rebuild(raw, pool_extents(size), mapped)?,
            nearly_full: AtomicBool::new(false),
        })
    }

    pub(crate) fn usage(&self) -> PackedUsage {
        self.state.usage()
    }

    /// Pool extents the blocks would take packed tight (what a compaction
    /// leaves, were no page under I/O).
    pub(crate) fn extents_needed(&self) -> u32 {
        self.state.slots().pool.extents_needed()
    }

    /// After a pool extent took a new VRAM slot: logs once when fewer than
    /// a tenth of the `capacity` slots held are left `free` (the status
    /// warns at the same point), and again after room came back.
    pub(crate) fn note_room(&self, free: u32, capacity: u32) {
        if !nearly_full(free, capacity) {
            if free.saturating_mul(5) > capacity {
                self.nearly_full.store(false, Relaxed);
            }
            return;
        }
        if !self.nearly_full.swap(true, Relaxed) {
            log::warn!(
                "compressed device: {free} of the {capacity} 2 MiB slots of VRAM held are left; \
                 writes beyond them need VRAM taken back from the GPU, else they fail with \
                 ENOSPC (swap keeps those pages in RAM)"
            );
        }
    }
}

/// Whether `free` of `capacity` slots is under a tenth.
fn nearly_full(free: u32, capacity: u32) -> bool {
    u64::from(free) * 10 < u64::from(capacity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_holds_every_page_raw_and_its_entry() {
        let size = 1u64 << 30;
        assert_eq!(pool_extents(size), 512 + POOL_CLASSES as u32);
        // 262144 pages x 16 bytes = 4 MiB: two slots.
        assert_eq!(page_map_slots(size), 2);
        assert_eq!(page_map_slots(4096), 1);
        assert_eq!(page_map_addr(0, 1), EXTENT + 16);
    }

    #[test]
    fn the_log_warns_under_a_tenth_of_the_slots_left() {
        assert!(nearly_full(9, 100) && !nearly_full(10, 100));
        assert!(nearly_full(0, 1) && !nearly_full(0, 0));
        let p = Packed::new(1 << 30, Compress::Lz, false);
        p.note_room(5, 100);
        assert!(p.nearly_full.load(Relaxed), "said once");
        p.note_room(15, 100);
        assert!(
            p.nearly_full.load(Relaxed),
            "not yet a fifth free: not said again"
        );
        p.note_room(30, 100);
        assert!(!p.nearly_full.load(Relaxed), "room came back");
    }
}
