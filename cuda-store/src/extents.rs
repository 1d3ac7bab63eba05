//! The extent map: which 2 MiB slot of VRAM holds each 2 MiB extent of the
//! device, so VRAM that holds no data can be given back while the device
//! stays up.
//!
//! The kernel's swap allocator spreads live pages over the whole area, so
//! whole 512 MiB chunks are practically never free at their own address.
//! With a map, discarded extents lose their slot, and releasing VRAM moves
//! the live extents of the last chunks into free slots of the first ones,
//! then frees those chunks. An unmapped extent reads as zeros.
//!
//! Each extent is one atomic word shared by every queue: the slot (+1; 0 is
//! unmapped), a count of in-flight requests using it ("pins"), and a
//! "moving" bit. A request pins only while the bit is clear, and a move (or
//! an unmapping) sets the bit only while nothing is pinned, both by
//! compare-and-swap on the same word, so data never moves under a request.
//!
//! What a crash must find: a mapping is recorded (the caller's `persist`)
//! before it is published, so no write lands in an extent whose slot the
//! record does not name; an unmapping is recorded, and its slot zeroed,
//! while the extent is held "moving", before the slot is free again. Free
//! slots are therefore zero, and a fresh mapping needs no zeroing.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Bytes per extent and per slot (the VRAM allocation granularity).
pub const EXTENT: u64 = 2 << 20;

const SLOT_MASK: u64 = 0xffff_ffff;
const PIN: u64 = 1 << 32;
const PINS_MASK: u64 = 0x7fff_ffff << 32;
const MOVING: u64 = 1 << 63;

/// Slot 0 holds the map itself in VRAM (see [`crate::store`]).
pub const MAP_SLOT: u32 = 0;

/// Bytes of the map's header (magic, extent count, padding) before its
/// entries.
pub(crate) const MAP_HEADER: u64 = 64;

/// Where slot `slot` starts, in VRAM mapped at `base`.
pub(crate) fn slot_addr(base: u64, slot: u32) -> u64 {
    base + u64::from(slot) * EXTENT
}

/// Where extent `e`'s map entry lives (in the map's slot).
pub(crate) fn entry_addr(base: u64, e: u32) -> u64 {
    slot_addr(base, MAP_SLOT) + MAP_HEADER + 4 * u64::from(e)
}

/// What pinning an extent found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pinned {
    /// The extent lives in this slot.
    Mapped(u32),
    /// The extent holds no data (reads are zeros).
    Unmapped,
    /// A write took this fresh (zeroed, recorded) slot for it.
    Allocated(u32),
}

/// Why an extent could not be pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinRefused {
    /// Its data is being moved: try again shortly.
    Moving,
    /// A write needs a slot and every slot under the capacity is taken.
    NoRoom,
    /// Recording a new mapping failed.
    NotRecorded,
}

/// Which slots are taken, and how many may be used (the VRAM held now).
#[derive(Debug)]
struct SlotPool {
    used: Vec<bool>,
    /// Slots [0, capacity) may be handed out.
    capacity: u32,
    /// Where the search for a free slot starts (no free slot below it).
    hint: u32,
    /// The first slot for data: those before hold the map and the
    /// checksums.
    first_data: u32,
}

impl SlotPool {
    fn take(&mut self) -> Option<u32> {
        let from = self.hint.max(self.first_data);
        let found = (from..self.capacity).find(|&s| !self.used[s as usize])?;
        self.used[found as usize] = true;
        self.hint = found + 1;
        Some(found)
    }

    fn give(&mut self, slot: u32) {
        if let Some(u) = self.used.get_mut(slot as usize) {
            *u = false;
            self.hint = self.hint.min(slot);
        }
    }

    fn free_below_capacity(&self) -> u32 {
        (self.first_data..self.capacity)
            .filter(|&s| !self.used[s as usize])
            .count() as u32
    }
}

/// Whether writes wait for VRAM to be taken back.
#[derive(Debug, Default)]
struct Room {
    /// A write found no free slot and waits (deferred) for more VRAM.
    wanted: bool,
    /// More VRAM could not be had: writes without a slot fail.
    refused: bool,
}

pub struct ExtentMap {
    words: Box<[AtomicU64]>,
    pool: Mutex<SlotPool>,
    room: Mutex<Room>,
    room_wanted: Condvar,
}

impl ExtentMap {
    /// `extents` extents, all unmapped, over `slots` slots of which the
    /// first `capacity` may be used; only the map's slot is not for data.
    pub fn new(extents: u32, slots: u32, capacity: u32) -> ExtentMap {
        ExtentMap::with_reserved(extents, slots, capacity, MAP_SLOT + 1)
    }

    /// As [`ExtentMap::new`], with the first `reserved` slots (the map's and
    /// the checksums') kept from data.
    pub fn with_reserved(extents: u32, slots: u32, capacity: u32, reserved: u32) -> ExtentMap {
        let reserved = reserved.max(MAP_SLOT + 1);
        let mut used = vec![false; slots as usize];
        for u in used.iter_mut().take(reserved as usize) {
            *u = true;
        }
        ExtentMap {
            words: (0..extents).map(|_| AtomicU64::new(0)).collect(),
            pool: Mutex::new(SlotPool {
                used,
                capacity: capacity.min(slots),
                hint: 0,
                first_data: reserved,
            }),
            room: Mutex::new(Room::default()),
            room_wanted: Condvar::new(),
        }
    }

    /// Rebuilds the map from recorded entries (slot + 1, 0 unmapped), as a
    /// recovering server reads them back. Entries naming a slot outside the
    /// first `capacity`, the map's own slot, or a slot already named are
    /// refused: such a map would serve one extent's data as another's.
    /// The first `reserved` slots hold the map and the checksums.
    pub fn from_entries(
        entries: &[u32],
        slots: u32,
        capacity: u32,
        reserved: u32,
    ) -> Result<ExtentMap, String> {
        let map = ExtentMap::with_reserved(entries.len() as u32, slots, capacity, reserved);
        {
            let mut pool = map.lock();
            for (e, &entry) in entries.iter().enumerate() {
                if entry == 0 {
                    continue;
                }
                let slot = entry - 1;
                if slot < pool.first_data || slot >= pool.capacity {
                    return Err(format!(
                        "extent {e} names slot {slot}, outside the data slots {}..{} held",
                        pool.first_data, pool.capacity
                    ));
                }
                if pool.used[slot as usize] {
                    return Err(format!("extent {e} names slot {slot}, named already"));
                }
                pool.used[slot as usize] = true;
                map.words[e].store(u64::from(entry), SeqCst);
            }
        }
        Ok(map)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotPool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn extents(&self) -> u32 {
        self.words.len() as u32
    }

    /// Pins extent `e` for one request; `write` asks for a slot when it has
    /// none. Every successful pin is matched by one [`unpin`]. For tests,
    /// with nothing to record; queues use [`pin_recorded`].
    ///
    /// [`unpin`]: ExtentMap::unpin
    /// [`pin_recorded`]: ExtentMap::pin_recorded
    #[cfg(test)]
    pub fn pin(&self, e: u32, write: bool) -> Result<Pinned, PinRefused> {
        self.pin_recorded(e, write, &mut |_| true)
    }

    /// As [`pin`], with `persist(slot)` called to record a new mapping
    /// before any other request can see it (false: not recorded).
    ///
    /// [`pin`]: ExtentMap::pin
    pub fn pin_recorded(
        &self,
        e: u32,
        write: bool,
        persist: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Pinned, PinRefused> {
        let Some(word) = self.words.get(e as usize) else {
            return Err(PinRefused::NoRoom);
        };
        let mut cur = word.load(SeqCst);
        loop {
            if cur & MOVING != 0 {
                return Err(PinRefused::Moving);
            }
            let slot = (cur & SLOT_MASK) as u32;
            if slot == 0 && write {
                match self.allocate(word, persist)? {
                    Some(p) => return Ok(p),
                    // Mapped meanwhile by another writer: pin theirs.
                    None => {
                        cur = word.load(SeqCst);
                        continue;
                    }
                }
            }
            match word.compare_exchange(cur, cur + PIN, SeqCst, SeqCst) {
                Ok(_) if slot == 0 => return Ok(Pinned::Unmapped),
                Ok(_) => return Ok(Pinned::Mapped(slot - 1)),
                Err(now) => cur = now,
            }
        }
    }

    /// Maps the extent behind `word` to a fresh slot, recorded, pinned;
    /// None when another writer mapped it first. Unmapped extents are
    /// mapped only here, under the pool lock, so between the check and the
    /// swap below only pins can change.
    fn allocate(
        &self,
        word: &AtomicU64,
        persist: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Option<Pinned>, PinRefused> {
        let mut pool = self.lock();
        let mut cur = word.load(SeqCst);
        if cur & MOVING != 0 {
            return Err(PinRefused::Moving);
        }
        if cur & SLOT_MASK != 0 {
            return Ok(None);
        }
        let slot = pool.take().ok_or(PinRefused::NoRoom)?;
        if !persist(slot) {
            pool.give(slot);
            return Err(PinRefused::NotRecorded);
        }
        loop {
            let new = (cur & PINS_MASK) + PIN + u64::from(slot) + 1;
            match word.compare_exchange(cur, new, SeqCst, SeqCst) {
                Ok(_) => return Ok(Some(Pinned::Allocated(slot))),
                Err(now) => cur = now,
            }
        }
    }

    pub fn unpin(&self, e: u32) {
        if let Some(word) = self.words.get(e as usize) {
            word.fetch_sub(PIN, SeqCst);
        }
    }

    /// Finishes an unmapping begun with [`begin_move`] (for a discard
    /// covering the whole extent), once the caller has recorded it and
    /// zeroed the slot: the extent reads as zeros, the slot is free.
    ///
    /// [`begin_move`]: ExtentMap::begin_move
    pub fn end_unmap(&self, e: u32) {
        self.settle(e, 0);
    }

    /// Ends a move or an unmapping: extent `e`'s word becomes `word` (no
    /// pins, not moving) and the slot it had is free again.
    fn settle(&self, e: u32, word: u64) {
        if let Some(w) = self.words.get(e as usize) {
            let old_slot = (w.swap(word, SeqCst) & SLOT_MASK) as u32;
            if old_slot > 0 {
                self.free(old_slot - 1);
            }
        }
    }

    pub fn free(&self, slot: u32) {
        self.lock().give(slot);
        self.lock_room().refused = false;
    }

    fn lock_room(&self) -> std::sync::MutexGuard<'_, Room> {
        self.room.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// For a write that found no free slot: true when it should wait (the
    /// keeper is asked for more VRAM), false when more cannot be had.
    pub fn want_room(&self) -> bool {
        let mut room = self.lock_room();
        if room.refused {
            return false;
        }
        room.wanted = true;
        self.room_wanted.notify_all();
        true
    }

    /// For the keeper: waits up to `limit` for a write to want room;
    /// whether one does.
    pub fn wait_room_wanted(&self, limit: Duration) -> bool {
        let room = self.lock_room();
        if room.wanted {
            return true;
        }
        let (room, _) = self
            .room_wanted
            .wait_timeout(room, limit)
            .unwrap_or_else(|p| p.into_inner());
        room.wanted
    }

    /// For the keeper: whether more VRAM was had. Either way the waiting
    /// writes go on: into the new room, or failing.
    pub fn room_answer(&self, grew: bool) {
        let mut room = self.lock_room();
        room.wanted = false;
        room.refused = !grew;
    }

    /// Whether writes without a slot fail now.
    pub fn room_refused(&self) -> bool {
        self.lock_room().refused
    }

    /// Starts moving (or unmapping) extent `e`: Some(its slot) once no
    /// request uses it, with new pins refused until [`end_move`] (or
    /// [`end_unmap`]) or [`abort_move`]. None when it is unmapped, already
    /// moving, or in use (try again).
    ///
    /// [`end_move`]: ExtentMap::end_move
    /// [`end_unmap`]: ExtentMap::end_unmap
    /// [`abort_move`]: ExtentMap::abort_move
    pub fn begin_move(&self, e: u32) -> Option<u32> {
        let word = self.words.get(e as usize)?;
        let cur = word.load(SeqCst);
        let slot = (cur & SLOT_MASK) as u32;
        if slot == 0 || cur & (MOVING | PINS_MASK) != 0 {
            return None;
        }
        word.compare_exchange(cur, cur | MOVING, SeqCst, SeqCst)
            .ok()?;
        Some(slot - 1)
    }

    /// Finishes a move: the extent lives in `slot` now; its old slot is
    /// free again.
    pub fn end_move(&self, e: u32, slot: u32) {
        self.settle(e, u64::from(slot) + 1);
    }

    pub fn abort_move(&self, e: u32) {
        if let Some(word) = self.words.get(e as usize) {
            word.fetch_and(!MOVING, SeqCst);
        }
    }

    /// The slot extent `e` lives in, if any.
    pub fn slot_of(&self, e: u32) -> Option<u32> {
        let w = self.words.get(e as usize)?.load(SeqCst);
        match (w & SLOT_MASK) as u32 {
            0 => None,
            s => Some(s - 1),
        }
    }

    /// A free slot under `below`, taken (for a move target).
    pub fn take_below(&self, below: u32) -> Option<u32> {
        let mut pool = self.lock();
        let cap = pool.capacity;
        pool.capacity = cap.min(below);
        let slot = pool.take();
        pool.capacity = cap;
        slot
    }

    /// Sets how many slots may be used (the VRAM held, in slots).
    pub fn set_capacity(&self, capacity: u32) {
        let mut pool = self.lock();
        pool.capacity = capacity.min(pool.used.len() as u32);
        pool.hint = 0;
    }

    /// Slots that may be used (the VRAM held, in slots).
    pub fn capacity(&self) -> u32 {
        self.lock().capacity
    }

    /// Free slots under the capacity: room for that many more extents.
    pub fn free_slots(&self) -> u32 {
        self.lock().free_below_capacity()
    }

    /// The free slots under the capacity, as runs (first, count).
    pub fn free_runs(&self) -> Vec<(u32, u32)> {
        let pool = self.lock();
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for s in (pool.first_data..pool.capacity).filter(|&s| !pool.used[s as usize]) {
            match runs.last_mut() {
                Some((first, count)) if *first + *count == s => *count += 1,
                _ => runs.push((s, 1)),
            }
        }
        runs
    }

    /// Whether any slot `from` or above is taken (mapped, or taken by a
    /// writer still recording its mapping).
    pub fn any_taken_from(&self, from: u32) -> bool {
        let pool = self.lock();
        pool.used.iter().skip(from as usize).any(|&u| u)
    }

    /// Slots before the first data slot (the map's and the checksums').
    pub fn reserved(&self) -> u32 {
        self.lock().first_data
    }

    /// Extents that hold data.
    pub fn mapped(&self) -> u32 {
        self.words
            .iter()
            .filter(|w| w.load(SeqCst) & SLOT_MASK != 0)
            .count() as u32
    }

    /// Extents whose slot is `from` or above, in order.
    pub fn mapped_at_or_above(&self, from: u32) -> Vec<u32> {
        (0..self.extents())
            .filter(|&e| self.slot_of(e).is_some_and(|s| s >= from))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_maps_an_extent_and_a_read_of_an_unmapped_one_does_not() {
        let m = ExtentMap::new(4, 8, 8);
        assert_eq!(m.pin(0, false), Ok(Pinned::Unmapped));
        m.unpin(0);
        assert_eq!(m.mapped(), 0);
        assert_eq!(m.pin(0, true), Ok(Pinned::Allocated(1)));
        assert_eq!(m.pin(0, true), Ok(Pinned::Mapped(1)));
        assert_eq!(m.pin(0, false), Ok(Pinned::Mapped(1)));
        assert_eq!(m.pin(2, true), Ok(Pinned::Allocated(2)));
        assert_eq!(m.mapped(), 2);
        assert_eq!(m.free_slots(), 5);
    }

    /// A discard's unmapping, as the queue does it (recording between).
    fn unmap(m: &ExtentMap, e: u32) -> Option<u32> {
        let slot = m.begin_move(e)?;
        m.end_unmap(e);
        Some(slot)
    }

    #[test]
    fn discard_unmaps_only_idle_extents_and_frees_the_slot() {
        let m = ExtentMap::new(4, 8, 8);
        assert_eq!(m.pin(1, true), Ok(Pinned::Allocated(1)));
        assert_eq!(unmap(&m, 1), None, "pinned by a write in flight");
        m.unpin(1);
        assert_eq!(m.begin_move(1), Some(1));
        assert_eq!(m.pin(1, false), Err(PinRefused::Moving), "while recorded");
        m.end_unmap(1);
        assert_eq!(unmap(&m, 1), None, "already unmapped");
        assert_eq!(m.pin(1, false), Ok(Pinned::Unmapped));
        assert_eq!(
            m.pin(3, true),
            Ok(Pinned::Allocated(1)),
            "the slot is free again"
        );
    }

    #[test]
    fn a_mapping_is_recorded_before_it_is_seen_and_a_failed_record_maps_nothing() {
        let m = ExtentMap::new(4, 8, 8);
        let mut seen = Vec::new();
        let got = m.pin_recorded(2, true, &mut |s| {
            // Not visible yet while it is being recorded.
            seen.push((s, m.slot_of(2)));
            true
        });
        assert_eq!(got, Ok(Pinned::Allocated(1)));
        assert_eq!(seen, vec![(1, None)]);
        assert_eq!(
            m.pin_recorded(3, true, &mut |_| false),
            Err(PinRefused::NotRecorded)
        );
        assert_eq!(m.slot_of(3), None);
        assert_eq!(
            m.pin(3, true),
            Ok(Pinned::Allocated(2)),
            "the slot went back"
        );
    }

    #[test]
    fn a_full_pool_refuses_writes_to_new_extents_but_serves_mapped_ones() {
        let m = ExtentMap::new(4, 3, 3);
        assert_eq!(m.pin(0, true), Ok(Pinned::Allocated(1)));
        assert_eq!(m.pin(1, true), Ok(Pinned::Allocated(2)));
        assert_eq!(m.pin(2, true), Err(PinRefused::NoRoom));
        assert_eq!(m.pin(0, true), Ok(Pinned::Mapped(1)));
        assert_eq!(m.pin(9, false), Err(PinRefused::NoRoom), "out of range");
    }

    #[test]
    fn a_move_waits_for_pins_and_blocks_new_ones() {
        let m = ExtentMap::new(2, 8, 8);
        assert_eq!(m.pin(0, true), Ok(Pinned::Allocated(1)));
        assert_eq!(m.begin_move(0), None, "in use");
        m.unpin(0);
        assert_eq!(m.begin_move(0), Some(1));
        assert_eq!(m.pin(0, false), Err(PinRefused::Moving));
        assert_eq!(m.pin(0, true), Err(PinRefused::Moving));
        assert_eq!(unmap(&m, 0), None, "a discard skips a moving extent");
        let to = m.take_below(8).unwrap();
        m.end_move(0, to);
        assert_eq!(m.pin(0, false), Ok(Pinned::Mapped(to)));
        m.unpin(0);
        // The old slot is free again.
        assert_eq!(m.pin(1, true), Ok(Pinned::Allocated(1)));
        assert_eq!(m.begin_move(1), None);
        m.unpin(1);
        assert_eq!(m.begin_move(1), Some(1));
        m.abort_move(1);
        assert_eq!(m.pin(1, false), Ok(Pinned::Mapped(1)));
    }

    #[test]
    fn lowering_the_capacity_keeps_new_slots_below_it() {
        let m = ExtentMap::new(8, 8, 8);
        for e in 0..6 {
            assert!(matches!(m.pin(e, true), Ok(Pinned::Allocated(_))));
            m.unpin(e);
        }
        for e in 0..4 {
            unmap(&m, e);
        }
        // Slots 1-4 free, 5 and 6 hold extents 4 and 5.
        m.set_capacity(4);
        assert_eq!(m.mapped_at_or_above(4), vec![4, 5]);
        assert_eq!(m.free_slots(), 3);
        assert_eq!(m.take_below(4), Some(1));
        assert_eq!(m.pin(7, true), Ok(Pinned::Allocated(2)));
        assert_eq!(m.pin(6, true), Ok(Pinned::Allocated(3)));
        assert_eq!(m.pin(0, true), Err(PinRefused::NoRoom));
    }

    #[test]
    fn a_write_without_room_waits_for_the_keeper_and_fails_once_refused() {
        let m = ExtentMap::new(4, 2, 2);
        assert_eq!(m.pin(0, true), Ok(Pinned::Allocated(1)));
        assert_eq!(m.pin(1, true), Err(PinRefused::NoRoom));
        assert!(!m.wait_room_wanted(Duration::from_millis(1)));
        assert!(m.want_room(), "the first asks and waits");
        assert!(m.wait_room_wanted(Duration::from_secs(5)));
        m.room_answer(false);
        assert!(m.room_refused());
        assert!(!m.want_room(), "refused: the write fails");
        // A slot freed by a discard is room again.
        m.unpin(0);
        unmap(&m, 0).unwrap();
        assert!(!m.room_refused());
        assert!(m.want_room());
        m.room_answer(true);
        assert!(!m.room_refused());
    }

    #[test]
    fn free_slots_come_as_runs_under_the_capacity() {
        let m = ExtentMap::from_entries(&[0, 3, 0, 6], 10, 8, 1).unwrap();
        assert_eq!(m.free_runs(), vec![(1, 1), (3, 2), (6, 2)]);
        m.set_capacity(5);
        assert_eq!(m.free_runs(), vec![(1, 1), (3, 2)]);
    }

    #[test]
    fn recorded_entries_rebuild_the_map_and_bad_ones_are_refused() {
        let m = ExtentMap::from_entries(&[0, 3, 0, 2], 8, 4, 1).unwrap();
        assert_eq!(m.slot_of(1), Some(2));
        assert_eq!(m.slot_of(3), Some(1));
        assert_eq!(m.mapped(), 2);
        assert_eq!(m.pin(0, true), Ok(Pinned::Allocated(3)));
        assert!(
            ExtentMap::from_entries(&[3, 3], 8, 8, 1).is_err(),
            "a slot twice"
        );
        assert!(
            ExtentMap::from_entries(&[1], 8, 8, 1).is_err(),
            "the map's slot"
        );
        assert!(
            ExtentMap::from_entries(&[6], 8, 4, 1).is_err(),
            "beyond what is held"
        );
    }

    #[test]
    fn reserved_slots_hold_no_data_and_are_never_free() {
        // Slot 0 the map, slots 1 and 2 checksums: data from slot 3.
        let m = ExtentMap::with_reserved(4, 8, 8, 3);
        assert_eq!(m.reserved(), 3);
        assert_eq!(m.pin(0, true), Ok(Pinned::Allocated(3)));
        assert_eq!(m.free_runs(), vec![(4, 4)]);
        assert_eq!(m.free_slots(), 4);
        assert!(
            ExtentMap::from_entries(&[3], 8, 8, 3).is_err(),
            "a checksum slot (2) named as data"
        );
        // Entries are slot + 1: extent 1 lives in slot 4.
        let r = ExtentMap::from_entries(&[0, 5], 8, 8, 3).unwrap();
        assert_eq!(r.free_runs(), vec![(3, 1), (5, 3)]);
    }
}
