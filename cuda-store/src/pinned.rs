//! Tables in pinned host memory that the GPU reads and writes through a
//! device-mapped alias: a queue round's copy-kernel descriptors and
//! checksums, and the ceiling measurement's buffers.

use crate::driver::{check, checked};
use crate::kernel::Desc;
use cudarc::driver::{result, sys};
use std::sync::atomic::{AtomicU64, Ordering};
use vramblk_store::StoreError;

static TABLES_MADE: AtomicU64 = AtomicU64::new(0);

/// How many pinned tables this process has allocated: a compressed queue
/// makes all of its own when it opens, and a check counts that it makes
/// none while it serves.
pub fn pinned_tables_made() -> u64 {
    TABLES_MADE.load(Ordering::Relaxed)
}

/// A table in pinned host memory the GPU reads and writes directly: a
/// round's copy-kernel descriptors, or the checksums the copy engines
/// carry. In a queue each is owned by its round, so a table is never
/// rewritten while a launch or copy that uses it may still run. Freed by
/// `free`, not on drop: a round keeps its table for reuse.
pub(crate) struct PinnedTable<T: Copy> {
    pub(crate) host: *mut T,
    pub(crate) dev: sys::CUdeviceptr,
    pub(crate) cap: usize,
    pub(crate) len: usize,
}

/// The copy kernel's descriptors.
pub(crate) type DescTable = PinnedTable<Desc>;

impl<T: Copy> PinnedTable<T> {
    pub(crate) const fn empty() -> PinnedTable<T> {
        PinnedTable {
            host: std::ptr::null_mut(),
            dev: 0,
            cap: 0,
            len: 0,
        }
    }

    /// Makes room for `n` entries, dropping what the table held (at least
    /// 256, in powers of two, so a table that grows grows seldom).
    pub(crate) fn reserve(&mut self, n: usize) -> Result<(), StoreError> {
        self.len = 0;
        if n <= self.cap {
            return Ok(());
        }
        self.allocate(n.next_power_of_two().max(256))
    }

    /// Makes room for exactly `n` entries (when it has less), dropping
    /// what the table held.
    pub(crate) fn reserve_exact(&mut self, n: usize) -> Result<(), StoreError> {
        self.len = 0;
        if n <= self.cap {
            return Ok(());
        }
        self.allocate(n)
    }

    fn allocate(&mut self, cap: usize) -> Result<(), StoreError> {
        self.free();
        TABLES_MADE.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the allocation is freed in free().
        let host = checked(
            unsafe {
                result::malloc_host(
                    cap * std::mem::size_of::<T>(),
                    sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP,
                )
            },
            "allocating a round's pinned table",
        )?;
        self.host = host.cast();
        self.cap = cap;
        // SAFETY: valid out-pointer, an allocation made with DEVICEMAP just
        // above (the device-pointer query is not in the result layer).
        check(
            unsafe { sys::cuMemHostGetDevicePointer_v2(&mut self.dev, host, 0) },
            "mapping a round's pinned table",
        )?;
        Ok(())
    }

    /// Adds `d`; false, adding nothing, when the table is full (the
    /// request it belongs to must then fail: a dropped descriptor would be
    /// a lost write or an unfilled read reported as done).
    #[must_use]
    pub(crate) fn push(&mut self, d: T) -> bool {
        if self.len >= self.cap {
            return false;
        }
        // SAFETY: len < cap, inside the allocation; the GPU does not read
        // this table until the launch or copy that follows.
        unsafe { self.host.add(self.len).write(d) };
        self.len += 1;
        true
    }

    /// Entry `i` as the finished round left it (None beyond the end).
    pub(crate) fn get(&self, i: usize) -> Option<T> {
        if i >= self.len {
            return None;
        }
        // SAFETY: i < len <= cap, inside the allocation; the GPU wrote it
        // (if at all) before the round's event completed, and the read is
        // volatile because that write is not the compiler's to see.
        Some(unsafe { self.host.add(i).read_volatile() })
    }

    /// Overwrites entry `i` (false beyond the end).
    pub(crate) fn set(&mut self, i: usize, d: T) -> bool {
        if i >= self.len {
            return false;
        }
        // SAFETY: i < len <= cap, inside the allocation; the caller's round
        // is finished, so no launch or copy uses it.
        unsafe { self.host.add(i).write(d) };
        true
    }

    /// The host address of entry `i`.
    pub(crate) fn host_at(&self, i: usize) -> *mut T {
        // SAFETY (of the pointer arithmetic): callers pass i <= len.
        self.host.wrapping_add(i)
    }

    pub(crate) fn free(&mut self) {
        if !self.host.is_null() {
            // SAFETY: allocated by cuMemHostAlloc in reserve(); no launch
            // or copy using it is in flight (its round is finished).
            let _ = unsafe { result::free_host(self.host.cast()) };
        }
        *self = PinnedTable::empty();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_descriptor_table_refuses_instead_of_dropping() {
        let mut backing = [Desc::default(); 2];
        let mut t = DescTable {
            host: backing.as_mut_ptr(),
            dev: 0,
            cap: 2,
            len: 0,
        };
        let d = |n| Desc {
            src: n,
            dst: n,
            len: 16,
            ..Desc::default()
        };
        assert!(t.push(d(1)));
        assert!(t.push(d(2)));
        assert!(!t.push(d(3)), "a third descriptor does not fit");
        assert_eq!(t.len, 2);
        assert_eq!(backing[1], d(2), "what was there is untouched");
    }
}
