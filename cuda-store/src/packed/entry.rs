//! One page's entry in a compressed device's page map: how the page is
//! stored and where, 16 bytes each, kept in VRAM after the extent map (so
//! a recovering server finds every page) and mirrored on the host (the
//! copy the queues read).
//!
//! Layout, little-endian: the same-filled word, or a stored page's
//! checksum (CRC32C of the whole page, with integrity on); the block's
//! place in the pool in 128-byte units (pool extent * 16384 + offset /
//! 128); the block's length in bytes; the kind. An all-zero entry is a
//! page never written (reads as zeros), which is what a fresh map holds.

use crate::extents::EXTENT;
use vramblk_compress::{class_of, CLASSES, CLASS_STEP, PAGE};

/// Bytes of one entry in VRAM.
pub(crate) const ENTRY_BYTES: u64 = 16;

/// Units of a block's place inside a pool extent.
const UNITS_PER_EXTENT: u32 = (EXTENT / CLASS_STEP as u64) as u32;

/// How many pool classes there are: the compressed ones, then raw pages.
pub(crate) const POOL_CLASSES: usize = CLASSES + 1;

/// The pool class of raw (whole) pages.
pub(crate) const RAW_CLASS: usize = CLASSES;

/// The slot size of pool class `c`.
pub(crate) const fn class_bytes(c: usize) -> u32 {
    if c >= RAW_CLASS {
        PAGE as u32
    } else {
        ((c + 1) * CLASS_STEP) as u32
    }
}

/// Slots of class `c` in one pool extent.
pub(crate) const fn slots_per_extent(c: usize) -> u32 {
    (EXTENT / class_bytes(c) as u64) as u32
}

/// A slot of the pool: pool extent, class, index inside the extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Loc {
    pub extent: u32,
    pub class: u8,
    pub index: u16,
}

impl Loc {
    /// Bytes of its slot.
    pub(crate) fn bytes(self) -> u64 {
        u64::from(class_bytes(self.class.into()))
    }

    /// Bytes from the pool extent's start.
    pub(crate) fn offset(self) -> u64 {
        u64::from(self.index) * u64::from(class_bytes(self.class.into()))
    }
}

/// What a page holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) enum Entry {
    /// Never written, or discarded: reads as zeros.
    #[default]
    Empty,
    /// Every 8-byte word is this one; no VRAM.
    Same(u64),
    /// An LZ4 block of `len` bytes at `at` (a compressed class's slot).
    Lz { at: Loc, len: u16, sum: u32 },
    /// The whole page at `at` (a raw slot).
    Raw { at: Loc, sum: u32 },
}

const KIND_EMPTY: u8 = 0;
const KIND_SAME: u8 = 1;
const KIND_LZ: u8 = 2;
const KIND_RAW: u8 = 3;

impl Entry {
    /// Where the page's block lives, for pages that take a slot.
    pub(crate) fn loc(self) -> Option<Loc> {
        match self {
            Entry::Lz { at, .. } | Entry::Raw { at, .. } => Some(at),
            _ => None,
        }
    }

    /// The checksum a stored page carries (None for pages without a block).
    pub(crate) fn sum(self) -> Option<u32> {
        match self {
            Entry::Lz { sum, .. } | Entry::Raw { sum, .. } => Some(sum),
            _ => None,
        }
    }

    /// The same page with its block in slot `to` (of the same class) instead:
    /// where a compaction moved it. Pages without a block are as they were.
    pub(crate) fn moved_to(self, to: Loc) -> Entry {
        match self {
            Entry::Lz { len, sum, .. } => Entry::Lz { at: to, len, sum },
            Entry::Raw { sum, .. } => Entry::Raw { at: to, sum },
            other => other,
        }
    }

    /// Bytes its block takes in a slot (0 for pages without one).
    pub(crate) fn stored_len(self) -> u64 {
        match self {
            Entry::Lz { len, .. } => u64::from(len),
            Entry::Raw { .. } => PAGE as u64,
            _ => 0,
        }
    }

    /// The 16 bytes kept in VRAM, as two little-endian words.
    pub(crate) fn encode(self) -> [u64; 2] {
        let (word, at, len, kind) = match self {
            Entry::Empty => (0, 0, 0, KIND_EMPTY),
            Entry::Same(w) => (w, 0, 0, KIND_SAME),
            Entry::Lz { at, len, sum } => (u64::from(sum), units(at), len, KIND_LZ),
            Entry::Raw { at, sum } => (u64::from(sum), units(at), PAGE as u16, KIND_RAW),
        };
        let hi = u64::from(at) | u64::from(len) << 32 | u64::from(kind) << 48;
        [word.to_le(), hi.to_le()]
    }

    /// Reads an entry back; Err says what is wrong with it (a map that
    /// names impossible places must not be served from).
    pub(crate) fn decode(raw: [u64; 2]) -> Result<Entry, String> {
        let (word, hi) = (u64::from_le(raw[0]), u64::from_le(raw[1]));
        let at = hi as u32;
        let len = (hi >> 32) as u16;
        let kind = (hi >> 48) as u8;
        let place = |class: usize| -> Result<Loc, String> {
            let extent = at / UNITS_PER_EXTENT;
            let offset = u64::from(at % UNITS_PER_EXTENT) * CLASS_STEP as u64;
            let bytes = u64::from(class_bytes(class));
            if !offset.is_multiple_of(bytes) || offset + bytes > EXTENT {
                return Err(format!(
                    "a block at byte {offset} of pool extent {extent} does not start a {bytes}-byte slot"
                ));
            }
            Ok(Loc {
                extent,
                class: class as u8,
                index: (offset / bytes) as u16,
            })
        };
        match kind {
            KIND_EMPTY if word == 0 && hi == 0 => Ok(Entry::Empty),
            KIND_SAME if hi >> 32 == u64::from(KIND_SAME) << 16 => Ok(Entry::Same(word)),
            KIND_LZ => {
                let class = class_of(len.into())
                    .filter(|_| len > 0)
                    .ok_or_else(|| format!("a block of {len} bytes"))?;
                Ok(Entry::Lz {
                    at: place(class.index())?,
                    len,
                    sum: word as u32,
                })
            }
            KIND_RAW if usize::from(len) == PAGE => Ok(Entry::Raw {
                at: place(RAW_CLASS)?,
                sum: word as u32,
            }),
            _ => Err(format!("an entry of kind {kind} reading {word:#x} {hi:#x}")),
        }
    }
}

/// A slot's place in 128-byte units.
fn units(at: Loc) -> u32 {
    at.extent * UNITS_PER_EXTENT + (at.offset() / CLASS_STEP as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_back_as_written() {
        let cases = [
            Entry::Empty,
            Entry::Same(0),
            Entry::Same(u64::MAX),
            Entry::Lz {
                at: Loc {
                    extent: 7,
                    class: 2,
                    index: 5460,
                },
                len: 301,
                sum: 0xdead_beef,
            },
            Entry::Lz {
                at: Loc {
                    extent: 0,
                    class: 0,
                    index: 0,
                },
                len: 1,
                sum: 0,
            },
            Entry::Raw {
                at: Loc {
                    extent: 200_000,
                    class: RAW_CLASS as u8,
                    index: 511,
                },
                sum: 1,
            },
        ];
        for e in cases {
            assert_eq!(Entry::decode(e.encode()), Ok(e), "{e:?}");
            let to = e.loc().map(|at| Loc { index: 0, ..at });
            let moved = to.map_or(e, |to| e.moved_to(to));
            assert_eq!(moved.loc(), to, "{e:?} moved");
            assert_eq!((moved.sum(), moved.stored_len()), (e.sum(), e.stored_len()));
        }
        assert_eq!(Entry::Empty.encode(), [0, 0], "a fresh map is all empty");
    }

    #[test]
    fn impossible_entries_are_refused() {
        let lz = Entry::Lz {
            at: Loc {
                extent: 1,
                class: 2,
                index: 3,
            },
            len: 300,
            sum: 0,
        }
        .encode();
        // The length says another class than the place was cut for.
        let mut other = lz;
        other[1] = (other[1] & !(0xffff << 32)) | (1000 << 32);
        assert!(Entry::decode(other).is_err());
        // Unknown kind, a too-long block, leftovers in an empty entry.
        assert!(Entry::decode([0, 9 << 48]).is_err());
        let mut long = lz;
        long[1] = (long[1] & !(0xffff << 32)) | (4000 << 32);
        assert!(Entry::decode(long).is_err());
        assert!(Entry::decode([5, 0]).is_err());
    }

    #[test]
    fn every_class_fills_its_extent_with_whole_slots() {
        for c in 0..POOL_CLASSES {
            let n = slots_per_extent(c);
            assert!(n >= 1 && n <= u32::from(u16::MAX), "class {c}: {n}");
            assert!(u64::from(n) * u64::from(class_bytes(c)) <= EXTENT);
        }
        assert_eq!(slots_per_extent(RAW_CLASS), 512);
        assert_eq!(slots_per_extent(0), 16384);
    }
}
