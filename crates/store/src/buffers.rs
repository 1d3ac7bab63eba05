use crate::StoreError;
use rustix::mm::{MapFlags, ProtFlags};
use std::ptr::NonNull;

/// One queue's io buffers: `count` slots of `slot_len` bytes in a single
/// page-aligned, locked mapping, so a store can pin or register all of them
/// with one call.
pub struct BufferRegion {
    base: NonNull<u8>,
    slot_len: usize,
    count: usize,
}

// SAFETY: the region is plain memory owned by this value; which thread
// touches which slot is governed by the queue that owns the tags.
unsafe impl Send for BufferRegion {}
// SAFETY: as above: shared references only hand out slot addresses, and
// each slot is used by the one queue thread that owns its tag.
unsafe impl Sync for BufferRegion {}

impl BufferRegion {
    /// Maps `count * slot_len` bytes, populated and locked: the kernel
    /// copies swap pages into these buffers while memory is short, so they
    /// must never fault.
    pub fn new(count: usize, slot_len: usize) -> Result<Self, StoreError> {
        Self::map(count, slot_len, MapFlags::PRIVATE)
    }

    /// As [`BufferRegion::new`], but shared with children forked later: a
    /// supervisor allocates these once, and every server it forks serves
    /// from them, so a server started while memory is short (its
    /// predecessor died with swap I/O pending) needs no new buffers.
    pub fn new_shared(count: usize, slot_len: usize) -> Result<Self, StoreError> {
        Self::map(count, slot_len, MapFlags::SHARED)
    }

    fn map(count: usize, slot_len: usize, sharing: MapFlags) -> Result<Self, StoreError> {
        if count == 0 || slot_len == 0 || !slot_len.is_multiple_of(4096) {
            return Err(StoreError::Invalid(format!(
                "io buffer region needs a positive count and a 4 KiB multiple slot size (got {count} x {slot_len})"
            )));
        }
        let len = count.checked_mul(slot_len).ok_or_else(|| {
            StoreError::Invalid(format!("io buffer region {count} x {slot_len} overflows"))
        })?;
        // SAFETY: an anonymous mapping with no address hint, owned by the
        // region from here on.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                sharing | MapFlags::POPULATE,
            )
        }
        .map_err(|e| StoreError::os(format!("mapping {} MiB of io buffers", len >> 20), e))?;
        // SAFETY: ptr/len is the mapping made just above.
        if let Err(e) = unsafe { rustix::mm::mlock(ptr, len) } {
            // SAFETY: unmapping the mapping made above, not used afterwards.
            let _ = unsafe { rustix::mm::munmap(ptr, len) };
            return Err(StoreError::os(
                format!(
                    "locking {} MiB of io buffers (raise RLIMIT_MEMLOCK or run as root)",
                    len >> 20
                ),
                e,
            ));
        }
        Ok(BufferRegion {
            base: NonNull::new(ptr.cast()).ok_or_else(|| {
                StoreError::Invalid("the kernel mapped the io buffers at address 0".into())
            })?,
            slot_len,
            count,
        })
    }

    pub fn slot_len(&self) -> usize {
        self.slot_len
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.slot_len * self.count
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The buffer of slot `index`, or `None` past the end.
    pub fn slot(&self, index: usize) -> Option<IoBuf> {
        if index >= self.count {
            return None;
        }
        // SAFETY: index < count, so the offset stays inside the mapping.
        let ptr = unsafe { self.base.as_ptr().add(index * self.slot_len) };
        Some(IoBuf {
            ptr: NonNull::new(ptr)?,
            len: self.slot_len,
        })
    }

    /// Byte offset of `buf` from the start of the region, if it lies inside.
    pub fn offset_of(&self, buf: IoBuf) -> Option<usize> {
        let start = self.base.as_ptr() as usize;
        let p = buf.ptr.as_ptr() as usize;
        (p >= start && p + buf.len <= start + self.len()).then(|| p - start)
    }
}

impl Drop for BufferRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; no IoBuf may outlive the region
        // (the queue drops its store handle and tasks first).
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len()) };
    }
}

/// A pointer to one io buffer slot. Plain data: the queue guarantees that
/// only the request holding a tag touches that tag's slot.
#[derive(Clone, Copy, Debug)]
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
}

impl IoBuf {
    pub fn as_ptr(self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(self) -> usize {
        self.len
    }

    pub fn is_empty(self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_tile_the_region() {
        let r = BufferRegion::new(4, 8192).unwrap();
        assert_eq!(r.len(), 4 * 8192);
        for i in 0..4 {
            let s = r.slot(i).unwrap();
            assert_eq!(s.len(), 8192);
            assert_eq!(r.offset_of(s), Some(i * 8192));
        }
        assert!(r.slot(4).is_none());
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(BufferRegion::new(0, 4096).is_err());
        assert!(BufferRegion::new(4, 1000).is_err());
        assert!(BufferRegion::new(usize::MAX, 4096).is_err());
    }
}
