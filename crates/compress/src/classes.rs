//! Size classes: the slot sizes compressed pages are kept in (zsmalloc's
//! idea, coarser so a GPU can address slots by class and index).
//!
//! Steps of 128 bytes: a page wastes 64 bytes of its slot on average, a few
//! percent of a typical 1.5 KiB block, where the 512-byte steps first
//! measured cost a sixth of the ratio (docs/benchmarks.md). A block larger
//! than the last class is stored whole: a slot that saved under 128 bytes
//! would not pay for decompressing it.

use crate::PAGE;

/// Bytes between one class and the next.
pub const CLASS_STEP: usize = 128;

/// Classes of compressed blocks: 128, 256, ..., 3968 bytes.
pub const CLASSES: usize = PAGE / CLASS_STEP - 1;

/// A size class: its slots hold blocks of up to [`Class::bytes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Class(u8);

impl Class {
    /// The class with index `i` (0 for the smallest), if there is one.
    pub fn from_index(i: usize) -> Option<Class> {
        (i < CLASSES).then_some(Class(i as u8))
    }

    pub fn index(self) -> usize {
        usize::from(self.0)
    }

    /// The slot size of this class.
    pub fn bytes(self) -> usize {
        (self.index() + 1) * CLASS_STEP
    }
}

/// The class a compressed block of `len` bytes goes in; None when it is
/// too large for any (the page is stored whole).
pub fn class_of(len: usize) -> Option<Class> {
    Class::from_index(len.max(1).div_ceil(CLASS_STEP) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_take_the_smallest_class_that_holds_them() {
        assert_eq!(class_of(0).map(Class::bytes), Some(128));
        assert_eq!(class_of(1).map(Class::bytes), Some(128));
        assert_eq!(class_of(128).map(Class::bytes), Some(128));
        assert_eq!(class_of(129).map(Class::bytes), Some(256));
        assert_eq!(class_of(3968).map(Class::bytes), Some(3968));
        assert_eq!(class_of(3969), None, "stored whole");
        assert_eq!(class_of(PAGE), None);
        for i in 0..CLASSES {
            let c = Class::from_index(i).unwrap();
            assert_eq!(c.index(), i);
            assert_eq!(class_of(c.bytes()), Some(c));
        }
        assert_eq!(Class::from_index(CLASSES), None);
    }
}
