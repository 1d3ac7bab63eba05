//! Compacting a compressed device's pool as a give-back begins (zsmalloc
//! compacts its classes the same way): per class, the blocks of the
//! sparsest pool extents move into free slots of the fullest, until the
//! sparse ones hold nothing and give their VRAM slots back. Without it,
//! pages discarded or rewritten all over a device leave every extent
//! partly filled, and a give-back finds nothing it can free.
//!
//! A block moves as a write stores one: its page is pending meanwhile (a
//! write, discard or read of it waits), the block is copied into its new
//! slot and then the page's entry in VRAM names that slot, both on one
//! stream, so a server killed at any point finds the page whole in one of
//! the two. Only once that has landed does the host's map name the new
//! slot; the old one is retired as a write retires it (reused once the
//! reads that looked the page up before have finished, state.rs).

use super::entry::{Entry, Loc};
use super::state::{State, SHARD_PAGES};
use super::{page_map_addr, Packed};
use crate::driver::SyncStream;
use crate::extents::{slot_addr, ExtentMap, PinRefused, Pinned};
use crate::queue::record_extent;
use fixedbitset::FixedBitSet;
use std::time::{Duration, Instant};
use vramblk_store::StoreError;

/// Blocks moved between two waits for the GPU: the pages of a batch stay
/// pending (their I/O waits) until it has landed.
const BATCH: usize = 256;

/// How long a compaction waits for reads to let go of the extents it
/// emptied (and for a give-back's move of an extent to end).
const LET_GO_WAIT: Duration = Duration::from_secs(2);

/// What a compaction did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Compacted {
    /// Blocks moved into other slots.
    pub blocks: u64,
    /// Pool extents that gave their VRAM slot back.
    pub unmapped: u32,
}

/// Compacts `packed`'s pool, whose extents live in the slots of
/// `extents` (VRAM from `base`); `stream` queues the moves. Pages under
/// I/O are passed by (their extents stay); so is the rest of a class once
/// writes took the room its blocks were to move into. Err: the GPU failed
/// a copy (what moved before stays moved, every page readable).
pub(crate) fn compact(
    packed: &Packed,
    extents: &ExtentMap,
    base: u64,
    stream: &SyncStream,
) -> Result<Compacted, StoreError> {
    let st = &packed.state;
    let drained = st.slots().pool.drain_sparse();
    let mut mover = Mover {
        st,
        extents,
        base,
        stream,
        batch: Vec::with_capacity(BATCH),
        words: Vec::with_capacity(BATCH * 2),
        emptied: Vec::new(),
    };
    let moved = if drained.is_clear() {
        Ok(0)
    } else {
        mover.move_out(&drained)
    };
    st.slots().pool.end_drain();
    let unmapped = mover.unmap_idle(&drained);
    Ok(Compacted {
        blocks: moved?,
        unmapped,
    })
}

/// A block on its way: page `page`, stored as `from`, into slot `to`; the
/// pool extents pinned for the copy.
struct Move {
    page: u64,
    from: Entry,
    to: Loc,
    pins: [u32; 2],
}

/// What a page's turn came to.
enum Step {
    Queued,
    /// Under I/O, changed meanwhile, or its extent could not be pinned:
    /// it stays where it is.
    Passed,
    /// Its class has no free slot outside the drained extents any more.
    NoRoom,
}

struct Mover<'a> {
    st: &'a State,
    extents: &'a ExtentMap,
    base: u64,
    stream: &'a SyncStream,
    batch: Vec<Move>,
    /// The batch's new entries, as written to VRAM.
    words: Vec<u64>,
    /// Pool extents the retired slots emptied.
    emptied: Vec<u32>,
}

impl Mover<'_> {
    /// Moves every block of the `drained` extents it can; the blocks moved.
    fn move_out(&mut self, drained: &FixedBitSet) -> Result<u64, StoreError> {
        let mut found = Vec::with_capacity(SHARD_PAGES as usize);
        let mut moved = 0;
        let mut full = [false; super::entry::POOL_CLASSES];
        for shard in 0..self.st.shard_count() {
            self.st.blocks_in(shard, drained, &mut found);
            for &(page, from) in &found {
                let Some(class) = from.loc().map(|at| usize::from(at.class)) else {
                    continue;
                };
                if full.get(class).copied().unwrap_or(true) {
                    continue;
                }
                match self.queue_move(page, from) {
                    Ok(Step::Queued) => {}
                    Ok(Step::Passed) => continue,
                    Ok(Step::NoRoom) => {
                        full[class] = true;
                        continue;
                    }
                    Err(e) => {
                        self.abandon();
                        return Err(e);
                    }
                }
                if self.batch.len() == BATCH {
                    moved += self.land()?;
                }
            }
        }
        moved += self.land()?;
        Ok(moved)
    }

    /// Queues the copy of page `page`'s block (stored as `from`, in a
    /// drained extent) into a free slot of a kept extent.
    fn queue_move(&mut self, page: u64, from: Entry) -> Result<Step, StoreError> {
        let Some(at) = from.loc() else {
            return Ok(Step::Passed);
        };
        if !self.st.try_mark(page, 1) {
            return Ok(Step::Passed);
        }
        // Looked up before the mark: a write may have replaced it since.
        if self.st.entry(page) != from {
            self.st.unmark(page, 1);
            return Ok(Step::Passed);
        }
        // Bound first: the pool's lock is let go before the page's shard
        // lock is taken below (no lock is held inside another here).
        let taken = self.st.slots().pool.take_kept(usize::from(at.class));
        let Some(to) = taken else {
            self.st.unmark(page, 1);
            return Ok(Step::NoRoom);
        };
        let slots = self
            .pin(at.extent, false)
            .and_then(|src| match self.pin(to.extent, true) {
                Some(dst) => Some((src, dst)),
                None => {
                    self.extents.unpin(at.extent);
                    None
                }
            });
        let Some((src, dst)) = slots else {
            self.untake(to);
            self.st.unmark(page, 1);
            return Ok(Step::Passed);
        };
        // SAFETY: both pool extents are pinned (mapped, not moved nor
        // unmapped meanwhile); the old slot is only read, and the new one
        // was just taken, so no other request touches it until the page's
        // entry names it, which happens after this copy, on this stream.
        let queued = unsafe {
            self.stream.copy(
                slot_addr(self.base, dst) + to.offset(),
                slot_addr(self.base, src) + at.offset(),
                at.bytes() as usize,
            )
        };
        if let Err(e) = queued {
            self.extents.unpin(at.extent);
            self.extents.unpin(to.extent);
            self.untake(to);
            self.st.unmark(page, 1);
            return Err(e);
        }
        self.batch.push(Move {
            page,
            from,
            to,
            pins: [at.extent, to.extent],
        });
        Ok(Step::Queued)
    }

    /// Pins pool extent `e` (mapping it first for `write` if it has no
    /// slot, as a writer's pin does); its VRAM slot. None when it cannot
    /// be (the move is passed by).
    fn pin(&self, e: u32, write: bool) -> Option<u32> {
        let deadline = Instant::now() + LET_GO_WAIT;
        loop {
            let got = self.extents.pin_recorded(e, write, &mut |s| {
                record_extent(self.stream, self.base, e, s + 1, None, None)
            });
            match got {
                Ok(Pinned::Mapped(s) | Pinned::Allocated(s)) => return Some(s),
                Ok(Pinned::Unmapped) => {
                    self.extents.unpin(e);
                    log::error!("compacting: pool extent {e} holds blocks but has no VRAM");
                    return None;
                }
                Err(PinRefused::Moving) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(_) => return None,
            }
        }
    }

    /// Frees slot `at`, taken for a move that was not queued: no page ever
    /// named it, so no read can be using it and it skips the limbo (its
    /// extent, a kept one, holds other blocks; were it emptied,
    /// `unmap_idle` finds it).
    fn untake(&self, at: Loc) {
        self.st.slots().pool.give(at);
    }

    /// Writes the batch's entries after its copies and waits for both;
    /// then the host's map names the new slots and the old ones retire.
    /// The blocks moved.
    fn land(&mut self) -> Result<u64, StoreError> {
        if self.batch.is_empty() {
            return Ok(0);
        }
        self.words.clear();
        for m in &self.batch {
            self.words.extend(m.from.moved_to(m.to).encode());
        }
        let mut queued = Ok(());
        for (m, entry) in self.batch.iter().zip(self.words.chunks(2)) {
            // SAFETY: the page's entry in the page map, which nobody else
            // writes while the page is pending; `words` is left as it is
            // until the wait below.
            queued = unsafe { self.stream.put(page_map_addr(self.base, m.page), entry) };
            if queued.is_err() {
                break;
            }
        }
        if let Err(e) = queued.and_then(|()| self.stream.wait()) {
            log::error!(
                "compacting: moving {} blocks failed ({e}); they stay where they were, and the \
                 slots taken for them stay taken until the server restarts",
                self.batch.len()
            );
            // VRAM may name the new slots already: they are not handed
            // out again, so whichever slot a restarted server finds holds
            // the page.
            self.abandon();
            return Err(e);
        }
        for m in &self.batch {
            self.st.set(m.page, m.from.moved_to(m.to));
            for &e in &m.pins {
                self.extents.unpin(e);
            }
        }
        let n = self.batch.len() as u64;
        {
            let mut sl = self.st.slots();
            let freed = self.batch.iter().filter_map(|m| m.from.loc());
            sl.retire(freed, &mut self.emptied);
        }
        for m in self.batch.drain(..) {
            self.st.unmark(m.page, 1);
        }
        Ok(n)
    }

    /// Lets go of a batch that did not land: its pins and its pages (the
    /// host's map still names the old slots).
    fn abandon(&mut self) {
        for m in self.batch.drain(..) {
            for e in m.pins {
                self.extents.unpin(e);
            }
            self.st.unmark(m.page, 1);
        }
    }

    /// Unmaps every pool extent that holds nothing but still has a VRAM
    /// slot (zeroed, the unmapping recorded, as a queue unmaps one),
    /// waiting a while for reads that still pin one or whose slots are
    /// still in limbo; how many were unmapped.
    fn unmap_idle(&mut self, drained: &FixedBitSet) -> u32 {
        let deadline = Instant::now() + LET_GO_WAIT;
        let mut unmapped = 0;
        loop {
            let mut sl = self.st.slots();
            sl.release(&mut self.emptied);
            self.emptied.clear();
            let mut busy = sl.limbo_holds(drained);
            for e in sl.pool.idle_extents() {
                if self.extents.slot_of(e).is_none() {
                    continue;
                }
                // Under the pool's lock: no slot of it is taken meanwhile.
                match self.extents.begin_move(e) {
                    Some(slot) => {
                        if record_extent(self.stream, self.base, e, 0, Some(slot), None) {
                            self.extents.end_unmap(e);
                            unmapped += 1;
                        } else {
                            self.extents.abort_move(e);
                        }
                    }
                    None => busy = true,
                }
            }
            drop(sl);
            if !busy || Instant::now() > deadline {
                return unmapped;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
