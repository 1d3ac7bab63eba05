//! The pool: which slot of which size class each compressed page's block
//! takes (zsmalloc's idea, in 2 MiB pool extents each cut for one class).
//!
//! Pool extents are the extent map's extents for a compressed device: the
//! map gives each the VRAM slot it lives in, so giving VRAM back moves
//! them as it moves a plain device's extents. This module only counts
//! which slots of each are taken; an extent whose last block goes is
//! class-less again and may be unmapped. Slots are handed out from the
//! lowest extent with room, which keeps data in few extents.
//!
//! Everything is sized when the pool is made and never grows: a server
//! serving swap takes slots while memory is short, and an allocation then
//! may wait for memory that only its own device can free (docs/design.md,
//! "No allocation while serving").

use super::entry::{slots_per_extent, Loc, POOL_CLASSES};
use fixedbitset::FixedBitSet;

/// Words of an extent's slot bitmap: enough for the class with the most
/// slots (the smallest blocks).
const TAKEN_WORDS: usize = (slots_per_extent(0) as usize).div_ceil(64);

#[derive(Clone, Debug)]
struct PoolExtent {
    /// The class it is cut for while it holds any block.
    class: Option<u8>,
    /// One bit per slot of that class (room for any class's slots, made
    /// once).
    taken: Box<[u64; TAKEN_WORDS]>,
    count: u32,
    /// Every word of `taken` before this one is full: a take looks from
    /// here (a 128-byte class has 256 words to look through otherwise,
    /// under the lock every queue takes its slots under).
    free_from: u16,
}

/// Slots of the pool, by class.
#[derive(Debug)]
pub(crate) struct Pool {
    extents: Vec<PoolExtent>,
    /// Per class: its extents with a free slot.
    room: Vec<FixedBitSet>,
    /// Extents of no class.
    idle: FixedBitSet,
    /// Extents a compaction is emptying: takes pass them by and frees do
    /// not offer their slots again (compact.rs).
    draining: FixedBitSet,
}

/// Whether giving a slot back emptied its extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Given {
    Kept,
    /// The extent holds nothing now: it may be unmapped.
    Emptied(u32),
}

impl Pool {
    /// `extents` pool extents, every slot free.
    pub(crate) fn new(extents: u32) -> Pool {
        let n = extents as usize;
        let mut idle = FixedBitSet::with_capacity(n);
        idle.insert_range(..);
        Pool {
            extents: (0..n)
                .map(|_| PoolExtent {
                    class: None,
                    taken: Box::new([0; TAKEN_WORDS]),
                    count: 0,
                    free_from: 0,
                })
                .collect(),
            room: vec![FixedBitSet::with_capacity(n); POOL_CLASSES],
            idle,
            draining: FixedBitSet::with_capacity(n),
        }
    }

    /// A free slot of class `class`: in the lowest extent of that class
    /// with room, else in the lowest idle extent. None when the pool is
    /// used up (its size covers a device of raw pages, so never while
    /// the map is right).
    pub(crate) fn take(&mut self, class: usize) -> Option<Loc> {
        self.take_in(class, true)
    }

    /// A free slot of class `class` in an extent already cut for it (never
    /// an idle one, nor one being drained): where a compaction moves a
    /// block to. None when no such extent has room.
    pub(crate) fn take_kept(&mut self, class: usize) -> Option<Loc> {
        self.take_in(class, false)
    }

    fn take_in(&mut self, class: usize, open_idle: bool) -> Option<Loc> {
        let e = match self.room.get(class)?.minimum() {
            Some(e) => e,
            None if !open_idle => return None,
            None => {
                let e = self.idle.minimum()?;
                self.idle.remove(e);
                let x = &mut self.extents[e];
                x.class = Some(class as u8);
                x.taken.fill(0);
                x.free_from = 0;
                self.room[class].insert(e);
                e
            }
        };
        let slots = slots_per_extent(class);
        let x = &mut self.extents[e];
        let words = &mut x.taken[..(slots as usize).div_ceil(64)];
        let from = usize::from(x.free_from).min(words.len());
        let (w, word) = words[from..]
            .iter()
            .enumerate()
            .find(|(_, w)| **w != u64::MAX)
            .map(|(w, word)| (from + w, word))?;
        x.free_from = w as u16;
        let index = w as u32 * 64 + word.trailing_ones();
        if index >= slots {
            return None;
        }
        x.taken[(index / 64) as usize] |= 1 << (index % 64);
        x.count += 1;
        if x.count == slots {
            self.room[class].remove(e);
        }
        Some(Loc {
            extent: e as u32,
            class: class as u8,
            index: index as u16,
        })
    }

    /// Frees `at`, taken before.
    pub(crate) fn give(&mut self, at: Loc) -> Given {
        let class = usize::from(at.class);
        let Some(x) = self.extents.get_mut(at.extent as usize) else {
            return Given::Kept;
        };
        let bit = 1u64 << (at.index % 64);
        let Some(word) = x.taken.get_mut(usize::from(at.index / 64)) else {
            return Given::Kept;
        };
        if x.class != Some(at.class) || *word & bit == 0 {
            log::error!("pool: {at:?} was freed but not taken; left as it is");
            return Given::Kept;
        }
        *word &= !bit;
        x.free_from = x.free_from.min(at.index / 64);
        x.count -= 1;
        let e = at.extent as usize;
        if x.count > 0 {
            if !self.draining.contains(e) {
                self.room[class].insert(e);
            }
            return Given::Kept;
        }
        x.class = None;
        self.room[class].remove(e);
        self.draining.remove(e);
        self.idle.insert(e);
        Given::Emptied(at.extent)
    }

    /// Pool extents the blocks need when packed tight: per class, its
    /// blocks over the slots an extent has, rounded up.
    /// (One pass over the extents: `status` asks for it, under the lock
    /// every queue takes its slots under.)
    pub(crate) fn extents_needed(&self) -> u32 {
        let mut blocks = [0u32; POOL_CLASSES];
        for x in &self.extents {
            if let Some(n) = x.class.and_then(|c| blocks.get_mut(usize::from(c))) {
                *n += x.count;
            }
        }
        (0..POOL_CLASSES)
            .map(|c| blocks[c].div_ceil(slots_per_extent(c)))
            .sum()
    }

    /// Starts a compaction: per class, every extent beyond the fullest
    /// ones that could hold all its blocks is drained (no take lands in
    /// it any more; its blocks are to move into the free slots of those
    /// kept). Returns the extents drained: the ones a compaction empties.
    pub(crate) fn drain_sparse(&mut self) -> FixedBitSet {
        // Each class's extents and their blocks, in one pass.
        let mut by_class: Vec<Vec<(u32, usize)>> = vec![Vec::new(); POOL_CLASSES];
        for (e, x) in self.extents.iter().enumerate() {
            if let Some(cut) = x.class.and_then(|c| by_class.get_mut(usize::from(c))) {
                cut.push((x.count, e));
            }
        }
        for (c, mut cut) in by_class.into_iter().enumerate() {
            let blocks: u32 = cut.iter().map(|(n, _)| n).sum();
            let kept = blocks.div_ceil(slots_per_extent(c)) as usize;
            // The fullest are kept (fewest blocks to move), the lowest
            // first among equals (data stays in few, low extents).
            cut.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            for &(_, e) in cut.iter().skip(kept) {
                self.draining.insert(e);
                self.room[c].remove(e);
            }
        }
        self.draining.clone()
    }

    /// Ends a compaction: extents it did not empty take blocks again.
    pub(crate) fn end_drain(&mut self) {
        for e in self.draining.ones() {
            let x = &self.extents[e];
            if let Some(c) = x.class {
                if x.count < slots_per_extent(c.into()) {
                    self.room[usize::from(c)].insert(e);
                }
            }
        }
        self.draining.clear();
    }

    /// Marks `at` taken, as a recovering server rebuilds the pool from the
    /// page map; Err when no such slot exists, another page has it, or its
    /// extent is cut for another class.
    pub(crate) fn mark(&mut self, at: Loc) -> Result<(), String> {
        let class = usize::from(at.class);
        let slots = slots_per_extent(class);
        let Some(x) = self.extents.get_mut(at.extent as usize) else {
            return Err(format!(
                "{at:?} lies beyond the pool's {} extents",
                self.extents.len()
            ));
        };
        if u32::from(at.index) >= slots {
            return Err(format!("{at:?}: its class has {slots} slots per extent"));
        }
        let e = at.extent as usize;
        match x.class {
            None => {
                x.class = Some(at.class);
                x.taken.fill(0);
                x.free_from = 0;
                self.idle.remove(e);
            }
            Some(c) if c != at.class => {
                return Err(format!("{at:?}: its extent holds blocks of class {c}"));
            }
            Some(_) => {}
        }
        let bit = 1u64 << (at.index % 64);
        let word = &mut x.taken[usize::from(at.index / 64)];
        if *word & bit != 0 {
            return Err(format!("{at:?} is named by two pages"));
        }
        *word |= bit;
        x.count += 1;
        if x.count < slots {
            self.room[class].insert(e);
        } else {
            self.room[class].remove(e);
        }
        Ok(())
    }

    /// The extents that hold no block.
    pub(crate) fn idle_extents(&self) -> impl Iterator<Item = u32> + '_ {
        self.idle.ones().map(|e| e as u32)
    }

    /// Whether extent `e` holds no block (may be unmapped).
    pub(crate) fn is_idle(&self, e: u32) -> bool {
        self.idle.contains(e as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::super::entry::RAW_CLASS;
    use super::*;

    #[test]
    fn slots_fill_the_lowest_extent_of_their_class_first() {
        let mut p = Pool::new(4);
        let a = p.take(0).unwrap();
        let b = p.take(RAW_CLASS).unwrap();
        assert_eq!((a.extent, a.index), (0, 0));
        assert_eq!((b.extent, b.index), (1, 0), "another class, another extent");
        let c = p.take(0).unwrap();
        assert_eq!((c.extent, c.index), (0, 1));
        assert_eq!(p.give(a), Given::Kept);
        assert_eq!(p.take(0).unwrap(), a, "a freed slot is used again");
        // A raw extent holds 512 pages; the 513th opens the next one.
        let raws: Vec<Loc> = (0..512).map(|_| p.take(RAW_CLASS).unwrap()).collect();
        assert_eq!(raws[510].extent, 1);
        assert_eq!(raws[511].extent, 2);
        for r in raws.iter().filter(|r| r.extent == 2) {
            assert_eq!(p.give(*r), Given::Emptied(2));
        }
        assert!(p.is_idle(2) && !p.is_idle(1));
    }

    #[test]
    fn freed_slots_anywhere_in_an_extent_are_found_again() {
        let mut p = Pool::new(2);
        let n = slots_per_extent(0) as usize;
        let all: Vec<Loc> = (0..n).map(|_| p.take(0).unwrap()).collect();
        assert!(all.iter().all(|l| l.extent == 0));
        assert_eq!(p.take(0).unwrap().extent, 1, "extent 0 is full");
        // Free slots far apart, the lowest last: each take finds the
        // lowest free one.
        for i in [n - 1, n / 2, 70, 3] {
            p.give(all[i]);
        }
        for i in [3, 70, n / 2, n - 1] {
            assert_eq!(p.take(0).unwrap(), all[i]);
        }
        assert_eq!(p.take(0).unwrap().extent, 1);
    }

    #[test]
    fn a_used_up_pool_refuses_and_a_bad_give_changes_nothing() {
        let mut p = Pool::new(1);
        for _ in 0..512 {
            p.take(RAW_CLASS).unwrap();
        }
        assert_eq!(p.take(RAW_CLASS), None);
        assert_eq!(p.take(0), None, "no idle extent for another class");
        let stranger = Loc {
            extent: 0,
            class: 0,
            index: 0,
        };
        assert_eq!(p.give(stranger), Given::Kept, "not of the extent's class");
    }

    #[test]
    fn a_rebuilt_pool_refuses_what_no_map_could_hold() {
        let mut p = Pool::new(2);
        let at = |extent, class, index| Loc {
            extent,
            class,
            index,
        };
        p.mark(at(0, 3, 9)).unwrap();
        assert!(p.mark(at(0, 3, 9)).is_err(), "twice");
        assert!(p.mark(at(0, 4, 1)).is_err(), "another class");
        assert!(p.mark(at(2, 3, 1)).is_err(), "beyond the pool");
        assert!(
            p.mark(at(1, RAW_CLASS as u8, 512)).is_err(),
            "beyond the extent"
        );
        // Rebuilt slots are not handed out again; the rest are.
        let next = p.take(3).unwrap();
        assert_eq!((next.extent, next.index), (0, 0));
        assert_ne!(p.take(3).unwrap().index, 9);
        assert!(p.is_idle(1));
    }

    #[test]
    fn a_compaction_empties_the_sparsest_extents_into_the_fullest() {
        let mut p = Pool::new(8);
        let n = slots_per_extent(3) as usize;
        let all: Vec<Loc> = (0..3 * n).map(|_| p.take(3).unwrap()).collect();
        let raw: Vec<Loc> = (0..10).map(|_| p.take(RAW_CLASS).unwrap()).collect();
        assert_eq!(raw[0].extent, 3);
        // Extent 0 keeps 3/4 of its blocks, extent 1 a quarter, extent 2
        // half: 1.5 extents of blocks, which two extents hold.
        let keep = |l: &Loc| match l.extent {
            0 => !l.index.is_multiple_of(4),
            1 => l.index.is_multiple_of(4),
            _ => l.index.is_multiple_of(2),
        };
        for l in all.iter().filter(|l| !keep(l)) {
            assert_eq!(p.give(*l), Given::Kept);
        }
        assert_eq!(p.extents_needed(), 2 + 1, "two of class 3, one raw");
        let drained = p.drain_sparse();
        assert_eq!(
            drained.ones().collect::<Vec<_>>(),
            vec![1],
            "the sparsest one"
        );
        // Neither kind of take lands in a drained extent, nor in an idle
        // one for a compaction.
        let t = p.take(3).unwrap();
        assert_ne!(t.extent, 1);
        p.give(t);
        let mut left: Vec<Loc> = all
            .iter()
            .filter(|l| l.extent == 1 && keep(l))
            .copied()
            .collect();
        let last = left.pop().unwrap();
        for l in left {
            let to = p.take_kept(3).unwrap();
            assert!(to.extent == 0 || to.extent == 2, "{to:?}");
            assert_eq!(
                p.give(l),
                Given::Kept,
                "a drained extent's slot is not offered again"
            );
        }
        p.take_kept(3).unwrap();
        assert_eq!(p.give(last), Given::Emptied(1));
        assert!(p.is_idle(1));
        assert_eq!(p.take_kept(5), None, "no extent of that class: none opened");
        p.end_drain();
        assert_eq!(p.drain_sparse().count_ones(..), 0, "packed tight now");
        p.end_drain();
        // Extent 1 is idle again; the kept extents still have room, and
        // the next take goes there, not to a fresh extent.
        let next = p.take(3).unwrap();
        assert!(next.extent == 0 || next.extent == 2);
    }

    #[test]
    fn an_ended_compaction_offers_the_extents_it_did_not_empty_again() {
        let mut p = Pool::new(4);
        let a = p.take(0).unwrap();
        let b = p.take(1).unwrap();
        let c: Vec<Loc> = (0..3).map(|_| p.take(1).unwrap()).collect();
        // Class 1 in one extent: nothing to drain; class 0 alone too.
        assert_eq!(p.drain_sparse().count_ones(..), 0);
        p.end_drain();
        assert_eq!((a.extent, b.extent, c[2].extent), (0, 1, 1));
        // Two half-empty raw extents: the second drains; ended before it
        // emptied, it takes blocks again.
        let raws: Vec<Loc> = (0..1024).map(|_| p.take(RAW_CLASS).unwrap()).collect();
        for r in raws.iter().filter(|r| r.index % 2 == 1) {
            p.give(*r);
        }
        assert_eq!(p.drain_sparse().ones().collect::<Vec<_>>(), vec![3]);
        assert_eq!(p.take(RAW_CLASS).unwrap().extent, 2);
        p.end_drain();
        let mut seen3 = false;
        for _ in 0..300 {
            seen3 |= p.take(RAW_CLASS).unwrap().extent == 3;
        }
        assert!(seen3, "extent 3 has room again");
    }
}
