//! What every queue of a compressed device shares: the host's copy of the
//! page map, the pool, the counts `status` shows, and the slots freed but
//! not yet reusable.
//!
//! A page's old slot is freed when the write that replaced it is done, but
//! a read on another queue may have looked the page up just before and
//! still be decompressing from that slot. So freed slots wait ("limbo")
//! until every read that began before they were freed has finished: each
//! queue publishes the epoch of its oldest read in flight, and a slot
//! freed at epoch E is reused only once every such epoch is above E.
//!
//! Two writes of one page on two queues, or a read of a page whose write
//! has not landed, must not overlap at all: the second write's entry could
//! land before the first's (a crash would then find a freed slot), or the
//! read decode a block still being copied. A page whose blocks or entry
//! are on their way is "pending"; whatever else comes for it waits (the
//! queue defers it) until that round is done.

use super::entry::{Entry, Loc};
use super::pool::{Given, Pool};
use fixedbitset::FixedBitSet;
use std::collections::VecDeque;

/// Freed slots the limbo holds without growing: it grows (an allocation,
/// which a server serving swap avoids) only when more than this many
/// slots are freed while one read is in flight; with no read in flight a
/// freed slot skips the limbo.
const LIMBO_ROOM: usize = 1 << 14;

/// Queues whose oldest reads are kept without growing (a queue beyond it
/// is counted once, when it opens).
const READERS_ROOM: usize = 256;

/// Pages by how they are stored, and the bytes their blocks take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackedUsage {
    /// Same-filled pages (no VRAM).
    pub same_pages: u64,
    /// Pages kept as LZ4 blocks.
    pub compressed_pages: u64,
    /// Pages that did not shrink, kept whole.
    pub raw_pages: u64,
    /// Bytes of the LZ4 blocks (before rounding to their slots).
    pub compressed_bytes: u64,
    /// Bytes the blocks' slots take (what their classes round up to).
    pub slot_bytes: u64,
}

impl PackedUsage {
    /// Bytes of data the device holds: every written page whole, as
    /// zramctl's DATA.
    pub fn data_bytes(&self) -> u64 {
        (self.same_pages + self.compressed_pages + self.raw_pages) * 4096
    }

    /// Bytes that data takes compressed, as zramctl's COMPR (same-filled
    /// pages take none).
    pub fn compr_bytes(&self) -> u64 {
        self.compressed_bytes + self.raw_pages * 4096
    }

    fn count(&mut self, e: Entry, sign: i64) {
        let add = |v: &mut u64, n: u64| *v = v.wrapping_add_signed(sign * n as i64);
        match e {
            Entry::Empty => {}
            Entry::Same(_) => add(&mut self.same_pages, 1),
            Entry::Lz { at, len, .. } => {
                add(&mut self.compressed_pages, 1);
                add(&mut self.compressed_bytes, u64::from(len));
                add(&mut self.slot_bytes, at.bytes());
            }
            Entry::Raw { .. } => {
                add(&mut self.raw_pages, 1);
                add(&mut self.slot_bytes, 4096);
            }
        }
    }
}

#[derive(Debug)]
pub(crate) struct State {
    /// Every page's entry, encoded as in VRAM.
    pages: Vec<[u64; 2]>,
    pub(crate) pool: Pool,
    usage: PackedUsage,
    epoch: u64,
    limbo: VecDeque<(u64, Loc)>,
    /// Per queue: the epoch of its oldest read in flight.
    readers: Vec<Option<u64>>,
    /// One bit per page: a write or discard of it is on its way.
    pending: FixedBitSet,
}

impl State {
    /// A device of `pages` pages, none written, over `extents` pool extents.
    pub(crate) fn new(pages: u64, extents: u32) -> State {
        State {
            pages: vec![[0, 0]; pages as usize],
            pool: Pool::new(extents),
            usage: PackedUsage::default(),
            epoch: 0,
            limbo: VecDeque::with_capacity(LIMBO_ROOM),
            readers: Vec::with_capacity(READERS_ROOM),
            pending: FixedBitSet::with_capacity(pages as usize),
        }
    }

    /// The `n` pages from `page`, cut to the device.
    fn range(&self, page: u64, n: u32) -> std::ops::Range<usize> {
        let end = self.pending.len();
        let start = (page as usize).min(end);
        start..(start + n as usize).min(end)
    }

    /// Whether any of the `n` pages from `page` is pending.
    pub(crate) fn pending_any(&self, page: u64, n: u32) -> bool {
        self.pending.contains_any_in_range(self.range(page, n))
    }

    /// Marks the `n` pages from `page` pending (`on`) or not.
    pub(crate) fn set_pending(&mut self, page: u64, n: u32, on: bool) {
        let r = self.range(page, n);
        self.pending.set_range(r, on);
    }

    /// Rebuilds the state from the page map read back from VRAM; `mapped`
    /// says whether a pool extent has VRAM. Err names the first entry no
    /// consistent map holds.
    pub(crate) fn rebuild(
        raw: Vec<[u64; 2]>,
        extents: u32,
        mapped: impl Fn(u32) -> bool,
    ) -> Result<State, String> {
        let mut s = State::new(raw.len() as u64, extents);
        for (page, r) in raw.iter().enumerate() {
            let e = Entry::decode(*r).map_err(|why| format!("page {page}: {why}"))?;
            if let Some(at) = e.loc() {
                if !mapped(at.extent) {
                    return Err(format!(
                        "page {page} names pool extent {}, which holds no VRAM",
                        at.extent
                    ));
                }
                s.pool
                    .mark(at)
                    .map_err(|why| format!("page {page}: {why}"))?;
            }
            s.usage.count(e, 1);
        }
        s.pages = raw;
        Ok(s)
    }

    /// Page `page`'s entry (Empty beyond the end).
    pub(crate) fn entry(&self, page: u64) -> Entry {
        let Some(&raw) = self.pages.get(page as usize) else {
            return Entry::Empty;
        };
        // Only this module writes the mirror, from entries it encoded or
        // checked at rebuild.
        Entry::decode(raw).unwrap_or_default()
    }

    /// Sets page `page`'s entry; returns the one it replaces.
    pub(crate) fn set(&mut self, page: u64, new: Entry) -> Entry {
        let old = self.entry(page);
        if let Some(slot) = self.pages.get_mut(page as usize) {
            *slot = new.encode();
            self.usage.count(old, -1);
            self.usage.count(new, 1);
        }
        old
    }

    pub(crate) fn usage(&self) -> PackedUsage {
        self.usage
    }

    /// The epoch a read that looks pages up now belongs to.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Queue `q`'s oldest read in flight began at `epoch` (None: it has
    /// none).
    pub(crate) fn set_reader(&mut self, q: usize, epoch: Option<u64>) {
        if self.readers.len() <= q {
            self.readers.resize(q + 1, None);
        }
        self.readers[q] = epoch;
    }

    /// Frees slots no page names any more: reused once no read that may
    /// still use them is in flight (at once when none is). Adds the pool
    /// extents emptied to `emptied`.
    pub(crate) fn retire(&mut self, freed: impl Iterator<Item = Loc>, emptied: &mut Vec<u32>) {
        let reading = self.readers.iter().any(Option::is_some);
        let mut any = false;
        for at in freed {
            any = true;
            if reading {
                self.limbo.push_back((self.epoch, at));
            } else if let Given::Emptied(e) = self.pool.give(at) {
                emptied.push(e);
            }
        }
        if any {
            self.epoch += 1;
        }
        self.release(emptied);
    }

    /// Hands back the slots in limbo that no read in flight can use; adds
    /// the pool extents emptied to `emptied`.
    pub(crate) fn release(&mut self, emptied: &mut Vec<u32>) {
        let oldest = self.readers.iter().flatten().min().copied();
        while let Some(&(freed_at, at)) = self.limbo.front() {
            if oldest.is_some_and(|r| r <= freed_at) {
                break;
            }
            self.limbo.pop_front();
            if let Given::Emptied(e) = self.pool.give(at) {
                emptied.push(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::entry::RAW_CLASS;
    use super::*;

    fn raw_at(s: &mut State) -> Entry {
        Entry::Raw {
            at: s.pool.take(RAW_CLASS).unwrap(),
            sum: 0,
        }
    }

    #[test]
    fn a_freed_slot_waits_for_the_reads_that_began_before() {
        let mut s = State::new(8, 4);
        let first = raw_at(&mut s);
        s.set(0, first);
        // Queue 1 looks page 0 up and starts reading it.
        let e = s.epoch();
        s.set_reader(1, Some(e));
        // Queue 0 rewrites page 0 elsewhere and frees the old slot.
        let second = raw_at(&mut s);
        let old = s.set(0, second);
        assert_eq!(old, first);
        let mut emptied = Vec::new();
        s.retire(old.loc().into_iter(), &mut emptied);
        assert!(emptied.is_empty());
        assert_ne!(
            s.pool.take(RAW_CLASS).unwrap(),
            first.loc().unwrap(),
            "the old slot is still being read"
        );
        // The read ends: the slot can be had again.
        s.set_reader(1, None);
        s.release(&mut emptied);
        assert_eq!(s.pool.take(RAW_CLASS).unwrap(), first.loc().unwrap());
        // A read that began after the free does not hold it back.
        let third = raw_at(&mut s);
        s.set(1, third);
        let old = s.set(1, Entry::Empty);
        s.set_reader(2, Some(s.epoch() + 1));
        s.retire(old.loc().into_iter(), &mut emptied);
        assert_eq!(s.pool.take(RAW_CLASS).unwrap(), third.loc().unwrap());
        // With no read in flight a freed slot is free at once.
        s.set_reader(2, None);
        let fourth = raw_at(&mut s);
        s.set(2, fourth);
        let old = s.set(2, Entry::Empty);
        s.retire(old.loc().into_iter(), &mut emptied);
        assert_eq!(s.pool.take(RAW_CLASS).unwrap(), fourth.loc().unwrap());
    }

    #[test]
    fn pending_pages_are_found_by_any_page_of_a_range() {
        let mut s = State::new(200, 4);
        s.set_pending(63, 2, true);
        assert!(s.pending_any(60, 4) && s.pending_any(64, 1));
        assert!(!s.pending_any(0, 63) && !s.pending_any(65, 100));
        s.set_pending(63, 1, false);
        assert!(!s.pending_any(63, 1) && s.pending_any(0, 200));
        assert!(!s.pending_any(500, 8), "beyond the device: nothing pending");
    }

    #[test]
    fn usage_counts_what_the_pages_hold() {
        let mut s = State::new(4, 4);
        s.set(0, Entry::Same(0));
        let at = s.pool.take(2).unwrap();
        s.set(
            1,
            Entry::Lz {
                at,
                len: 300,
                sum: 0,
            },
        );
        let r = raw_at(&mut s);
        s.set(2, r);
        let u = s.usage();
        assert_eq!((u.same_pages, u.compressed_pages, u.raw_pages), (1, 1, 1));
        assert_eq!(u.data_bytes(), 3 * 4096);
        assert_eq!(u.compr_bytes(), 300 + 4096);
        assert_eq!(u.slot_bytes, 384 + 4096);
        s.set(1, Entry::Empty);
        assert_eq!(s.usage().compressed_bytes, 0);
        assert_eq!(s.usage().data_bytes(), 2 * 4096);
    }

    #[test]
    fn a_map_read_back_rebuilds_the_pool_or_says_what_is_wrong() {
        let mut s = State::new(3, 4);
        let a = raw_at(&mut s);
        s.set(0, a);
        s.set(2, Entry::Same(7));
        let raw: Vec<[u64; 2]> = (0..3).map(|p| s.entry(p).encode()).collect();
        let back = State::rebuild(raw.clone(), 4, |e| e == 0).unwrap();
        assert_eq!(back.usage(), s.usage());
        assert_eq!(back.entry(0), a);
        let mut back = back;
        assert_ne!(back.pool.take(RAW_CLASS).unwrap(), a.loc().unwrap());
        let err = State::rebuild(raw.clone(), 4, |_| false).unwrap_err();
        assert!(err.contains("holds no VRAM"), "{err}");
        let mut twice = raw;
        twice[1] = twice[0];
        let err = State::rebuild(twice, 4, |_| true).unwrap_err();
        assert!(err.contains("two pages"), "{err}");
    }
}
