//! Test hooks beside the data path: where a byte of the device lives in
//! VRAM, flipping one bit there, reading a page's stored checksum.

use super::CudaStore;
use crate::driver::checked;
use crate::extents::EXTENT;
use cudarc::driver::result;
use vramblk_store::StoreError;

impl CudaStore {
    /// Where the data of device byte `offset` lives in VRAM; None when its
    /// extent (a compressed device: its page) holds no data there.
    pub(super) fn vram_of(&self, offset: u64) -> Option<u64> {
        if let Some(packed) = &self.packed {
            // A compressed page's block: the byte as far into it as the
            // block goes (a same-filled page has none).
            let entry = packed.state.entry(offset / crate::PAGE);
            let at = entry.loc()?;
            let slot = self.extents.slot_of(at.extent)?;
            let within = (offset % crate::PAGE).min(entry.stored_len().saturating_sub(1));
            return Some(self.slot_addr(slot) + at.offset() + within);
        }
        let slot = self.extents.slot_of(u32::try_from(offset / EXTENT).ok()?)?;
        Some(self.slot_addr(slot) + offset % EXTENT)
    }

    /// Test hook: flips the lowest bit of the byte at device `offset` in
    /// VRAM, leaving its checksum as it was, as a bit flipped in the memory
    /// itself would. False (nothing done) when its extent holds no data.
    pub fn flip_bit(&self, offset: u64) -> Result<bool, StoreError> {
        let Some(at) = self.vram_of(offset) else {
            return Ok(false);
        };
        self.make_current()?;
        let mut byte = [0u8];
        // SAFETY: `at` lies in a mapped slot; a one-byte local buffer.
        unsafe {
            checked(
                result::memcpy_dtoh_sync(&mut byte, at),
                "reading a byte to flip",
            )?;
            byte[0] ^= 1;
            checked(
                result::memcpy_htod_sync(at, &byte),
                "writing the flipped byte",
            )?;
        }
        Ok(true)
    }

    /// The checksum stored for the page at device `offset` (for the GPU
    /// checks, which compare it with [`crate::page_sum`] of the data); None
    /// without integrity or when its extent holds no data.
    pub fn stored_checksum(&self, offset: u64) -> Result<Option<u32>, StoreError> {
        if let Some(packed) = &self.packed {
            let entry = packed.state.entry(offset / crate::PAGE);
            return Ok(entry.sum().filter(|_| self.integrity));
        }
        let e = u32::try_from(offset / EXTENT).ok();
        if !self.integrity || self.vram_of(offset).is_none() {
            return Ok(None);
        }
        let Some(e) = e else { return Ok(None) };
        self.make_current()?;
        let mut sum = [0u32];
        let at = crate::integrity::sum_addr(self.base, e, offset % EXTENT);
        // SAFETY: the checksum slots are mapped (they precede the data);
        // a four-byte local buffer.
        checked(
            unsafe { result::memcpy_dtoh_sync(&mut sum, at) },
            "reading a checksum",
        )?;
        Ok(Some(sum[0]))
    }
}
