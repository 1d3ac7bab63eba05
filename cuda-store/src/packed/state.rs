//! What every queue of a compressed device shares: the host's copy of the
//! page map, the pool, the counts `status` shows, and the slots freed but
//! not yet reusable.
//!
//! The page map is cut into shards of [`SHARD_PAGES`] pages, each with its
//! own lock (with its pages' pending marks and counts), and the pool with
//! the freed slots has one more: queues working on different pages do not
//! wait for each other. One lock for all of it bounded 16 queues to about
//! 0.5 M writes and 1.1 M reads a second on the H200, every round waiting
//! about a millisecond for it (docs/benchmarks.md, "Where a compressed
//! round's time goes").
//!
//! A page's old slot is freed when the write that replaced it is done, but
//! a read on another queue may have looked the page up just before and
//! still be decompressing from that slot. So freed slots wait ("limbo")
//! until every read that began before they were freed has finished: each
//! queue publishes the epoch of its oldest read in flight (before it looks
//! any page up), and a slot freed at epoch E is reused only once every
//! such epoch is above E.
//!
//! Two writes of one page on two queues, or a read of a page whose write
//! has not landed, must not overlap at all: the second write's entry could
//! land before the first's (a crash would then find a freed slot), or the
//! read decode a block still being copied. A page whose blocks or entry
//! are on their way is "pending"; whatever else comes for it waits (the
//! queue defers it) until that round is done. A read looks a page up under
//! the same lock that says it is not pending.

use super::entry::{Entry, Loc};
use super::pool::{Given, Pool};
use crate::stages::{self, Stage};
use fixedbitset::FixedBitSet;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

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

/// Pages of one shard of the page map (4 MiB of data): a request of up
/// to 512 KiB touches one or two.
pub(crate) const SHARD_PAGES: u64 = 1024;

/// Keeps what it holds on cache lines of its own, so that queues taking
/// neighbouring locks do not slow each other down.
#[derive(Debug)]
#[repr(align(64))]
struct OwnLine<T>(T);

/// One shard's pages: their entries (encoded as in VRAM), which are
/// pending, and what they count for.
#[derive(Debug)]
struct Shard {
    entries: Vec<[u64; 2]>,
    pending: FixedBitSet,
    usage: PackedUsage,
}

impl Shard {
    fn entry(&self, i: usize) -> Entry {
        let Some(&raw) = self.entries.get(i) else {
            return Entry::Empty;
        };
        // Only this module writes the mirror, from entries it encoded or
        // checked at rebuild.
        Entry::decode(raw).unwrap_or_default()
    }
}

/// The pool and the slots freed but not yet given back to it.
#[derive(Debug)]
pub(crate) struct Slots {
    pub(crate) pool: Pool,
    epoch: u64,
    limbo: VecDeque<(u64, Loc)>,
    /// Per queue: the epoch of its oldest read in flight.
    readers: Vec<Option<u64>>,
}

#[derive(Debug)]
pub(crate) struct State {
    pages: u64,
    shards: Box<[OwnLine<Mutex<Shard>>]>,
    slots: OwnLine<Mutex<Slots>>,
}

/// Locks `m`, timing the wait as `stage` when round stages are timed
/// (stages.rs).
fn lock<T>(m: &Mutex<T>, stage: Stage) -> MutexGuard<'_, T> {
    if let Ok(g) = m.try_lock() {
        return g;
    }
    let clock = stages::start();
    let g = m.lock().unwrap_or_else(|p| p.into_inner());
    stages::lap(stage, clock);
    g
}

impl State {
    /// A device of `pages` pages, none written, over `extents` pool extents.
    pub(crate) fn new(pages: u64, extents: u32) -> State {
        let shards = pages.div_ceil(SHARD_PAGES);
        State {
            pages,
            shards: (0..shards)
                .map(|i| {
                    let n = (pages - i * SHARD_PAGES).min(SHARD_PAGES) as usize;
                    OwnLine(Mutex::new(Shard {
                        entries: vec![[0, 0]; n],
                        pending: FixedBitSet::with_capacity(n),
                        usage: PackedUsage::default(),
                    }))
                })
                .collect(),
            slots: OwnLine(Mutex::new(Slots {
                pool: Pool::new(extents),
                epoch: 0,
                limbo: VecDeque::with_capacity(LIMBO_ROOM),
                readers: Vec::with_capacity(READERS_ROOM),
            })),
        }
    }

    /// The pool and the freed slots (one lock for every queue: take what
    /// a round needs of it at once).
    pub(crate) fn slots(&self) -> MutexGuard<'_, Slots> {
        lock(&self.slots.0, Stage::PoolWait)
    }

    /// The `n` pages from `page`, cut to the device, by shard: each
    /// shard's index, the range of its pages, and where that range starts
    /// in the `n`.
    fn pieces(&self, page: u64, n: u32) -> impl Iterator<Item = (usize, Range<usize>, usize)> {
        let start = page.min(self.pages);
        let end = page.saturating_add(u64::from(n)).min(self.pages);
        let mut at = start;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let shard = at / SHARD_PAGES;
            let first = at % SHARD_PAGES;
            let last = (end - shard * SHARD_PAGES).min(SHARD_PAGES);
            let piece = (
                shard as usize,
                first as usize..last as usize,
                (at - start) as usize,
            );
            at = shard * SHARD_PAGES + last;
            Some(piece)
        })
    }

    fn shard(&self, i: usize) -> MutexGuard<'_, Shard> {
        lock(&self.shards[i].0, Stage::MapWait)
    }

    /// Whether any of the `n` pages from `page` is pending.
    pub(crate) fn pending_any(&self, page: u64, n: u32) -> bool {
        self.pieces(page, n)
            .any(|(i, r, _)| self.shard(i).pending.contains_any_in_range(r))
    }

    /// Marks the `n` pages from `page` pending, unless one of them is
    /// already (then nothing is marked and it says false).
    pub(crate) fn try_mark(&self, page: u64, n: u32) -> bool {
        let mut marked = 0;
        for (i, r, at) in self.pieces(page, n) {
            let mut sh = self.shard(i);
            if sh.pending.contains_any_in_range(r.clone()) {
                drop(sh);
                // The shards before were marked here (none of their pages
                // was pending): another queue that saw them meanwhile
                // only waited.
                self.unmark(page, marked);
                return false;
            }
            sh.pending.set_range(r.clone(), true);
            marked = (at + r.len()) as u32;
        }
        true
    }

    /// Lets go of the `n` pages from `page`, marked pending before.
    pub(crate) fn unmark(&self, page: u64, n: u32) {
        for (i, r, _) in self.pieces(page, n) {
            self.shard(i).pending.set_range(r, false);
        }
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
        // Not shared yet: no lock is taken.
        let pool = &mut s.slots.0.get_mut().unwrap_or_else(|p| p.into_inner()).pool;
        for (page, r) in raw.into_iter().enumerate() {
            let e = Entry::decode(r).map_err(|why| format!("page {page}: {why}"))?;
            if let Some(at) = e.loc() {
                if !mapped(at.extent) {
                    return Err(format!(
                        "page {page} names pool extent {}, which holds no VRAM",
                        at.extent
                    ));
                }
                pool.mark(at).map_err(|why| format!("page {page}: {why}"))?;
            }
            let shard = &mut s.shards[page / SHARD_PAGES as usize].0;
            let sh = shard.get_mut().unwrap_or_else(|p| p.into_inner());
            sh.entries[page % SHARD_PAGES as usize] = r;
            sh.usage.count(e, 1);
        }
        Ok(s)
    }

    /// Page `page`'s entry (Empty beyond the end).
    pub(crate) fn entry(&self, page: u64) -> Entry {
        if page >= self.pages {
            return Entry::Empty;
        }
        let sh = self.shard((page / SHARD_PAGES) as usize);
        sh.entry((page % SHARD_PAGES) as usize)
    }

    /// The entries of the `n` pages from `page` into `out` (beyond the
    /// device: Empty), each looked up under the lock that says it is not
    /// pending; false (`out` half filled) when one is.
    pub(crate) fn settled(&self, page: u64, n: u32, out: &mut [Entry]) -> bool {
        out.fill(Entry::Empty);
        for (i, r, at) in self.pieces(page, n) {
            let sh = self.shard(i);
            if sh.pending.contains_any_in_range(r.clone()) {
                return false;
            }
            for (k, p) in r.enumerate() {
                if let Some(o) = out.get_mut(at + k) {
                    *o = sh.entry(p);
                }
            }
        }
        true
    }

    /// Sets page `page`'s entry; returns the one it replaces.
    pub(crate) fn set(&self, page: u64, new: Entry) -> Entry {
        if page >= self.pages {
            return Entry::Empty;
        }
        let mut sh = self.shard((page / SHARD_PAGES) as usize);
        let i = (page % SHARD_PAGES) as usize;
        let old = sh.entry(i);
        sh.entries[i] = new.encode();
        sh.usage.count(old, -1);
        sh.usage.count(new, 1);
        old
    }

    /// How many shards the page map is cut into.
    pub(crate) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The pages of shard `i` whose blocks lie in one of the pool
    /// `extents`, with their entries, into `out` (cleared first; a shard
    /// has at most [`SHARD_PAGES`], which `out` is best made room for).
    pub(crate) fn blocks_in(&self, i: usize, extents: &FixedBitSet, out: &mut Vec<(u64, Entry)>) {
        out.clear();
        if i >= self.shards.len() {
            return;
        }
        let sh = self.shard(i);
        for p in 0..sh.entries.len() {
            let e = sh.entry(p);
            if e.loc()
                .is_some_and(|at| extents.contains(at.extent as usize))
            {
                out.push((i as u64 * SHARD_PAGES + p as u64, e));
            }
        }
    }

    /// What the pages hold, summed over the shards.
    pub(crate) fn usage(&self) -> PackedUsage {
        let mut u = PackedUsage::default();
        for i in 0..self.shards.len() {
            let s = self.shard(i).usage;
            u.same_pages += s.same_pages;
            u.compressed_pages += s.compressed_pages;
            u.raw_pages += s.raw_pages;
            u.compressed_bytes += s.compressed_bytes;
            u.slot_bytes += s.slot_bytes;
        }
        u
    }
}

impl Slots {
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

    /// Whether a slot in limbo lies in one of the pool `extents`.
    pub(crate) fn limbo_holds(&self, extents: &FixedBitSet) -> bool {
        self.limbo
            .iter()
            .any(|(_, at)| extents.contains(at.extent as usize))
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

    fn raw_at(s: &State) -> Entry {
        Entry::Raw {
            at: s.slots().pool.take(RAW_CLASS).unwrap(),
            sum: 0,
        }
    }

    fn take_raw(s: &State) -> Loc {
        s.slots().pool.take(RAW_CLASS).unwrap()
    }

    #[test]
    fn a_freed_slot_waits_for_the_reads_that_began_before() {
        let s = State::new(8, 4);
        let first = raw_at(&s);
        s.set(0, first);
        // Queue 1 looks page 0 up and starts reading it.
        let e = s.slots().epoch();
        s.slots().set_reader(1, Some(e));
        // Queue 0 rewrites page 0 elsewhere and frees the old slot.
        let second = raw_at(&s);
        let old = s.set(0, second);
        assert_eq!(old, first);
        let mut emptied = Vec::new();
        s.slots().retire(old.loc().into_iter(), &mut emptied);
        assert!(emptied.is_empty());
        assert_ne!(
            take_raw(&s),
            first.loc().unwrap(),
            "the old slot is still being read"
        );
        // The read ends: the slot can be had again.
        s.slots().set_reader(1, None);
        s.slots().release(&mut emptied);
        assert_eq!(take_raw(&s), first.loc().unwrap());
        // A read that began after the free does not hold it back.
        let third = raw_at(&s);
        s.set(1, third);
        let old = s.set(1, Entry::Empty);
        let later = s.slots().epoch() + 1;
        s.slots().set_reader(2, Some(later));
        s.slots().retire(old.loc().into_iter(), &mut emptied);
        assert_eq!(take_raw(&s), third.loc().unwrap());
        // With no read in flight a freed slot is free at once.
        s.slots().set_reader(2, None);
        let fourth = raw_at(&s);
        s.set(2, fourth);
        let old = s.set(2, Entry::Empty);
        s.slots().retire(old.loc().into_iter(), &mut emptied);
        assert_eq!(take_raw(&s), fourth.loc().unwrap());
    }

    #[test]
    fn pending_pages_are_found_by_any_page_of_a_range_across_shards() {
        let n = SHARD_PAGES * 2 + 200;
        let s = State::new(n, 4);
        let edge = SHARD_PAGES - 1;
        assert!(s.try_mark(edge, 2));
        assert!(s.pending_any(edge - 3, 4) && s.pending_any(SHARD_PAGES, 1));
        assert!(!s.pending_any(0, edge as u32) && !s.pending_any(SHARD_PAGES + 1, 100));
        // A range that meets a pending page marks none of its pages.
        assert!(!s.try_mark(SHARD_PAGES - 10, 20));
        assert!(!s.pending_any(SHARD_PAGES - 10, 9));
        assert!(!s.pending_any(SHARD_PAGES + 1, 9));
        s.unmark(edge, 1);
        assert!(!s.pending_any(edge, 1) && s.pending_any(0, n as u32));
        assert!(
            !s.try_mark(SHARD_PAGES - 5, SHARD_PAGES as u32 + 100),
            "page {SHARD_PAGES} is still pending"
        );
        s.unmark(SHARD_PAGES, 1);
        // Three shards at once, and a range cut at the device's end.
        assert!(s.try_mark(1, n as u32 + 50));
        assert!(s.pending_any(n - 1, 1) && !s.pending_any(0, 1));
        s.unmark(1, n as u32 + 50);
        assert!(!s.pending_any(0, n as u32));
        assert!(
            !s.pending_any(n + 500, 8),
            "beyond the device: nothing pending"
        );
    }

    #[test]
    fn a_lookup_sees_every_page_across_shards_or_says_one_is_pending() {
        let n = SHARD_PAGES * 2;
        let s = State::new(n, 4);
        let edge = SHARD_PAGES - 2;
        for k in 0..4 {
            s.set(edge + k, Entry::Same(k));
        }
        let mut out = [Entry::Empty; 6];
        assert!(s.settled(edge - 1, 6, &mut out));
        let want: Vec<Entry> = [Entry::Empty]
            .into_iter()
            .chain((0..4).map(Entry::Same))
            .chain([Entry::Empty])
            .collect();
        assert_eq!(out.to_vec(), want);
        assert!(s.try_mark(SHARD_PAGES + 1, 1));
        assert!(
            !s.settled(edge - 1, 6, &mut out),
            "page past the edge is pending"
        );
        let mut tail = [Entry::Same(9); 3];
        assert!(s.settled(n - 1, 3, &mut tail));
        assert_eq!(tail, [Entry::Empty; 3], "beyond the device: Empty");
    }

    #[test]
    fn usage_counts_what_the_pages_hold() {
        let s = State::new(SHARD_PAGES + 4, 4);
        s.set(0, Entry::Same(0));
        let at = s.slots().pool.take(2).unwrap();
        s.set(
            SHARD_PAGES + 1,
            Entry::Lz {
                at,
                len: 300,
                sum: 0,
            },
        );
        let r = raw_at(&s);
        s.set(2, r);
        let u = s.usage();
        assert_eq!((u.same_pages, u.compressed_pages, u.raw_pages), (1, 1, 1));
        assert_eq!(u.data_bytes(), 3 * 4096);
        assert_eq!(u.compr_bytes(), 300 + 4096);
        assert_eq!(u.slot_bytes, 384 + 4096);
        s.set(SHARD_PAGES + 1, Entry::Empty);
        assert_eq!(s.usage().compressed_bytes, 0);
        assert_eq!(s.usage().data_bytes(), 2 * 4096);
    }

    #[test]
    fn a_map_read_back_rebuilds_the_pool_or_says_what_is_wrong() {
        let s = State::new(SHARD_PAGES + 3, 4);
        let a = raw_at(&s);
        s.set(0, a);
        s.set(SHARD_PAGES + 2, Entry::Same(7));
        let raw: Vec<[u64; 2]> = (0..SHARD_PAGES + 3).map(|p| s.entry(p).encode()).collect();
        let back = State::rebuild(raw.clone(), 4, |e| e == 0).unwrap();
        assert_eq!(back.usage(), s.usage());
        assert_eq!(back.entry(0), a);
        assert_eq!(back.entry(SHARD_PAGES + 2), Entry::Same(7));
        assert_ne!(take_raw(&back), a.loc().unwrap());
        let err = State::rebuild(raw.clone(), 4, |_| false).unwrap_err();
        assert!(err.contains("holds no VRAM"), "{err}");
        let mut twice = raw;
        twice[1] = twice[0];
        let err = State::rebuild(twice, 4, |_| true).unwrap_err();
        assert!(err.contains("two pages"), "{err}");
    }

    #[test]
    fn queues_marking_overlapping_ranges_never_hold_a_page_together() {
        // Ranges that straddle shard edges, marked and let go by several
        // threads: a page is never marked by two at once.
        let n = SHARD_PAGES * 3;
        let s = State::new(n, 4);
        let owner: Vec<std::sync::atomic::AtomicU8> = (0..n)
            .map(|_| std::sync::atomic::AtomicU8::new(0))
            .collect();
        std::thread::scope(|sc| {
            for t in 1..=4u8 {
                let (s, owner) = (&s, &owner);
                sc.spawn(move || {
                    let mut x = u64::from(t) * 7919;
                    for _ in 0..20_000 {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let len = 1 + (x >> 33) % 300;
                        let page = SHARD_PAGES - 150 + (x >> 20) % 300 + (x % 2) * SHARD_PAGES;
                        if !s.try_mark(page, len as u32) {
                            continue;
                        }
                        for p in page..page + len {
                            let was =
                                owner[p as usize].swap(t, std::sync::atomic::Ordering::SeqCst);
                            assert_eq!(was, 0, "page {p} held by {was} and {t}");
                        }
                        for p in page..page + len {
                            owner[p as usize].store(0, std::sync::atomic::Ordering::SeqCst);
                        }
                        s.unmark(page, len as u32);
                    }
                });
            }
        });
        assert!(!s.pending_any(0, n as u32));
    }
}
