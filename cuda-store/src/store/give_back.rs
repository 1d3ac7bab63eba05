//! Giving VRAM back while the device stays up (a compressed device's pool
//! compacted first, then the data of the last chunks moved into free slots
//! of the first, then those chunks freed) and taking it back; the room
//! writes wait for meanwhile.

use super::{chunk_len, CudaStore, CHUNK_SLOTS};
use crate::driver::{check, SyncStream};
use crate::extents::EXTENT;
use crate::packed;
use crate::BACKOFF_STEP;
use cudarc::driver::sys;
use std::time::{Duration, Instant};
use vramblk_store::StoreError;

/// Chunks a give-back down to `target` bytes keeps while `needed` slots
/// hold data (the mapped extents, the map and the checksums): at least the
/// first chunk.
pub(super) fn chunks_kept(target: u64, needed: u32) -> u32 {
    let needed = target.div_ceil(EXTENT).max(u64::from(needed)) as u32;
    needed.div_ceil(CHUNK_SLOTS).max(1)
}

/// What a give-back to nothing would free from chunks of `lens` bytes
/// while `needed` slots hold data.
fn unused_of(lens: &[u64], needed: u32) -> u64 {
    lens.iter().skip(chunks_kept(0, needed) as usize).sum()
}

/// How long giving VRAM back waits for requests on one extent to finish.
const MOVE_WAIT: Duration = Duration::from_secs(2);

/// What giving VRAM back did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resized {
    /// VRAM held before and after, bytes.
    pub before: u64,
    pub after: u64,
    /// Extents moved to make whole chunks free.
    pub moved: u32,
    /// A compressed device's blocks moved to pack its pool tight first.
    pub blocks_moved: u64,
}

impl CudaStore {
    /// Bytes a give-back to nothing would free now: what is held beyond
    /// the whole chunks the data needs.
    pub fn unused_bytes(&self) -> u64 {
        let lens: Vec<u64> = self.lock_chunks().iter().map(|c| c.len as u64).collect();
        unused_of(&lens, self.slots_needed())
    }

    /// Slots the data needs: the maps' and the mapped extents', of a
    /// compressed device only as many pool extents as its blocks take
    /// packed tight (what compacting its pool leaves).
    fn slots_needed(&self) -> u32 {
        let mapped = self.extents.mapped();
        let data = match &self.packed {
            Some(p) => mapped.min(p.extents_needed()),
            None => mapped,
        };
        data + self.extents.reserved()
    }

    /// Packs a compressed device's pool tight when that would let a give-back
    /// down to `target` free one of the `chunks` more; the blocks moved.
    fn compact_for(&self, target: u64, chunks: usize) -> Result<u64, StoreError> {
        let Some(p) = &self.packed else {
            return Ok(0);
        };
        let now = chunks_kept(target, self.extents.mapped() + self.extents.reserved());
        if chunks_kept(target, self.slots_needed()) >= now.min(chunks as u32) {
            return Ok(0);
        }
        let stream = SyncStream::new()?;
        let done = packed::compact(p, &self.extents, self.base, &stream)?;
        log::info!(
            "cuda store: compacted the compressed pages: {} blocks moved, {} pool extents ({} MiB) \
             emptied",
            done.blocks,
            done.unmapped,
            (u64::from(done.unmapped) * EXTENT) >> 20
        );
        Ok(done.blocks)
    }

    /// Gives VRAM back while the device stays up: moves the data of the
    /// last chunks into free slots of the first ones, then frees those
    /// chunks, down to `target` bytes held or to what the data needs,
    /// whichever is more. The caller tells the fds' other holders to let
    /// the freed chunks go.
    pub fn give_back(&self, target: u64) -> Result<Resized, StoreError> {
        let mut chunks = self.lock_chunks();
        self.make_current()?;
        let before: u64 = chunks.iter().map(|c| c.len as u64).sum();
        let held_slots = (before / EXTENT) as u32;
        let blocks_moved = self.compact_for(target, chunks.len())?;
        let keep_chunks = chunks_kept(target, self.extents.mapped() + self.extents.reserved());
        if keep_chunks as usize >= chunks.len() {
            return Ok(Resized {
                before,
                after: before,
                moved: 0,
                blocks_moved,
            });
        }
        let keep_slots = keep_chunks * CHUNK_SLOTS;
        self.extents.set_capacity(keep_slots);
        let moved = match self.empty_slots_from(keep_slots) {
            Ok(n) => n,
            Err(e) => {
                self.extents.set_capacity(held_slots);
                return Err(e);
            }
        };
        for (i, c) in chunks.drain(keep_chunks as usize..).enumerate() {
            let at = self.base + u64::from(keep_chunks + i as u32) * BACKOFF_STEP;
            // SAFETY: no extent lives in this chunk any more and no slot in
            // it can be handed out (capacity), so no copy touches it.
            unsafe {
                check(sys::cuMemUnmap(at, c.len), "cuMemUnmap")?;
                check(sys::cuMemRelease(c.handle), "cuMemRelease")?;
            }
        }
        let after = chunks.iter().map(|c| c.len as u64).sum();
        log::info!(
            "cuda store: gave back {} MiB of VRAM ({} MiB held, {} extents moved)",
            (before - after) >> 20,
            after >> 20,
            moved
        );
        Ok(Resized {
            before,
            after,
            moved,
            blocks_moved,
        })
    }

    /// Moves every extent living in slot `from` or above below it; waits
    /// for slots a writer took there before the capacity fell.
    pub(super) fn empty_slots_from(&self, from: u32) -> Result<u32, StoreError> {
        let stream = SyncStream::new()?;
        let deadline = Instant::now() + MOVE_WAIT;
        let mut moved = 0;
        loop {
            for e in self.extents.mapped_at_or_above(from) {
                if self.move_extent(e, from, &stream)? {
                    moved += 1;
                }
            }
            if self.extents.mapped_at_or_above(from).is_empty()
                && !self.extents.any_taken_from(from)
            {
                return Ok(moved);
            }
            if Instant::now() > deadline {
                return Err(StoreError::Unavailable(
                    "requests kept the last chunks busy; nothing was given back".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Moves extent `e` into a free slot under `below`; false when it needs
    /// no move any more (unmapped or below meanwhile).
    pub(super) fn move_extent(
        &self,
        e: u32,
        below: u32,
        stream: &SyncStream,
    ) -> Result<bool, StoreError> {
        let deadline = Instant::now() + MOVE_WAIT;
        let from = loop {
            if self.extents.slot_of(e).is_none_or(|s| s < below) {
                return Ok(false);
            }
            if let Some(s) = self.extents.begin_move(e) {
                break s;
            }
            if Instant::now() > deadline {
                return Err(StoreError::Unavailable(format!(
                    "extent {e} stayed in use; nothing was given back"
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        let Some(to) = self.extents.take_below(below) else {
            self.extents.abort_move(e);
            return Err(StoreError::Unavailable(
                "no free slot to move data into; nothing was given back".into(),
            ));
        };
        // SAFETY: both slots are mapped and nobody else touches them (the
        // extent is moving, the target slot is freshly taken); the entry
        // lies in the map's slot. The map names the new slot only once the
        // data is there, and the old slot is zero before it is free.
        let copied = unsafe {
            stream
                .copy(self.slot_addr(to), self.slot_addr(from), EXTENT as usize)
                .and_then(|()| stream.put_u32(self.entry_addr(e), to + 1))
                .and_then(|()| stream.zero(self.slot_addr(from), EXTENT as usize))
                .and_then(|()| stream.wait())
        };
        if let Err(err) = copied {
            self.extents.free(to);
            self.extents.abort_move(e);
            return Err(err);
        }
        self.extents.end_move(e, to);
        Ok(true)
    }

    /// Takes VRAM back up to `target` bytes held (at most the whole
    /// device), chunk by chunk, while the GPU keeps `floor` bytes free.
    /// The new chunks are not used until [`open_held`]: the caller first
    /// hands their fds to the other holders, so no data lands in VRAM that
    /// a crash would lose. Returns the bytes held now.
    ///
    /// [`open_held`]: CudaStore::open_held
    pub fn take_back(&self, target: u64, floor: u64) -> Result<u64, StoreError> {
        let mut chunks = self.lock_chunks();
        self.make_current()?;
        let want =
            (target.div_ceil(EXTENT).min(u64::from(self.slots)) as u32).div_ceil(CHUNK_SLOTS);
        let prop = self.prop();
        while (chunks.len() as u32) < want {
            let i = chunks.len() as u32;
            let len = chunk_len(i, self.slots);
            let free = self.free_vram()?;
            if free < len as u64 + floor {
                log::info!(
                    "cuda store: {} MiB free on {}; not taking {} MiB more (keeping {} MiB free)",
                    free >> 20,
                    self.name,
                    len >> 20,
                    floor >> 20
                );
                break;
            }
            let c = self.create_chunk(len, &prop)?;
            let at = self.base + u64::from(i) * BACKOFF_STEP;
            let mapped = self.map_chunk(i, &c).and_then(|()| {
                // SAFETY: just mapped, ours, beyond the capacity (no queue
                // writes there yet); free slots must be zero.
                unsafe { self.zero_now(at, len, "zeroing new VRAM") }
            });
            if let Err(e) = mapped {
                // SAFETY: the handle is ours; unmapping what may be mapped.
                unsafe {
                    sys::cuMemUnmap(at, len);
                    sys::cuMemRelease(c.handle);
                }
                return Err(e);
            }
            chunks.push(c);
        }
        Ok(chunks.iter().map(|c| c.len as u64).sum())
    }

    /// Lets writes use every slot held (after [`take_back`]).
    ///
    /// [`take_back`]: CudaStore::take_back
    pub fn open_held(&self) {
        let held = self.held_slots();
        self.extents.set_capacity(held);
    }

    /// Room for new data, bytes: free slots under the capacity.
    pub fn room_bytes(&self) -> u64 {
        u64::from(self.extents.free_slots()) * EXTENT
    }

    /// Waits up to `limit` for a write that found no room (it waits, its
    /// queue retrying, until [`room_answer`]); whether one came.
    ///
    /// [`room_answer`]: CudaStore::room_answer
    pub fn wait_room_wanted(&self, limit: Duration) -> bool {
        self.extents.wait_room_wanted(limit)
    }

    /// Whether VRAM was taken back for waiting writes; false makes writes
    /// with no room fail (ENOSPC) until a slot frees or VRAM is had.
    pub fn room_answer(&self, grew: bool) {
        self.extents.room_answer(grew)
    }

    pub fn room_refused(&self) -> bool {
        self.extents.room_refused()
    }
}

#[cfg(test)]
mod tests {
    use super::unused_of;

    const MIB: u64 = 1 << 20;

    #[test]
    fn unused_vram_counts_whole_chunks_beyond_what_the_data_needs() {
        // A 2 GiB device held whole: 4 chunks of 512 MiB and 2 MiB.
        let whole = [512 * MIB, 512 * MIB, 512 * MIB, 512 * MIB, 2 * MIB];
        // 258 MiB of data (128 extents and the map: 129 slots) keeps one chunk: 1538
        // MiB could go.
        assert_eq!(unused_of(&whole, 129), 1538 * MIB);
        // 600 MiB keeps two.
        assert_eq!(unused_of(&whole, 300), 1026 * MIB);
        // Nothing beyond the first chunk, or nearly full: nothing.
        assert_eq!(unused_of(&[512 * MIB], 1), 0);
        assert_eq!(unused_of(&whole, 1025), 0);
    }
}
