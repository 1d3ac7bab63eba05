//! The extent map in slot 0: written fresh for a new device, read back by
//! a server that recovers or takes over one, and the zeroing both need
//! (free slots are always zero).

use super::{reserved_for, CudaStore};
use crate::driver::checked;
use crate::extents::{ExtentMap, EXTENT, MAP_HEADER};
use cudarc::driver::result;
use std::sync::Arc;
use vramblk_store::StoreError;

/// The map's header: magic, then the extent count (u64), then the layout's
/// flags (u64), then padding.
pub(super) const MAP_MAGIC: [u8; 8] = *b"VRAMBLK\x01";

/// Header flag: the slots after the map's hold page checksums.
pub(super) const HEADER_INTEGRITY: u64 = 1;

impl CudaStore {
    /// A fresh device: every slot zero (a free slot always is), every
    /// extent unmapped, all slots held usable.
    pub(super) fn write_empty_map(&mut self) -> Result<(), StoreError> {
        let extents = self.size.div_ceil(EXTENT) as u32;
        let mut header = [0u8; MAP_HEADER as usize];
        header[..8].copy_from_slice(&MAP_MAGIC);
        header[8..16].copy_from_slice(&u64::from(extents).to_le_bytes());
        header[16..24].copy_from_slice(&self.header_flags().to_le_bytes());
        let held = self.held_bytes() as usize;
        // SAFETY: the held bytes from the start of the range are mapped
        // (slot 0 among them) and no queue runs yet; the header is a live
        // local array.
        unsafe {
            self.zero_now(self.base, held, "zeroing the new VRAM")?;
            checked(
                result::memcpy_htod_sync(self.base, &header),
                "writing the extent map",
            )?;
            checked(result::ctx::synchronize(), "writing the extent map")?;
        }
        let held = self.held_slots();
        let reserved = reserved_for(self.size, self.integrity);
        self.extents = Arc::new(ExtentMap::with_reserved(
            extents, self.slots, held, reserved,
        ));
        Ok(())
    }

    pub(super) fn header_flags(&self) -> u64 {
        if self.integrity {
            HEADER_INTEGRITY
        } else {
            0
        }
    }

    /// For a server taking over imported VRAM, once the server that used
    /// it before is gone: reads the map again (a standby imported it long
    /// before; the old server has mapped and unmapped extents since) and
    /// zeroes every slot it does not name, which the old server may have
    /// been freeing or moving from when it died (free slots must be zero).
    pub fn take_over(&mut self) -> Result<(), StoreError> {
        self.make_current()?;
        self.read_map()?;
        for (first, count) in self.extents.free_runs() {
            // SAFETY: free slots of held chunks (under the capacity read
            // with the map): mapped, named by no extent, and no other
            // server runs on this VRAM any more.
            unsafe {
                self.zero_now(
                    self.slot_addr(first),
                    (u64::from(count) * EXTENT) as usize,
                    "zeroing free VRAM",
                )?
            };
        }
        Ok(())
    }

    /// Zeroes `len` bytes of VRAM at `at` and waits for it: the queues'
    /// streams do not wait for the default one.
    ///
    /// # Safety
    /// The range is mapped and no stream uses it meanwhile.
    pub(super) unsafe fn zero_now(
        &self,
        at: u64,
        len: usize,
        what: &str,
    ) -> Result<(), StoreError> {
        // SAFETY: as the caller promised; then a wait on this context.
        checked(unsafe { result::memset_d8_sync(at, 0, len) }, what)?;
        checked(result::ctx::synchronize(), what)
    }

    /// Reads back the map a previous server left in slot 0.
    pub(super) fn read_map(&mut self) -> Result<(), StoreError> {
        let extents = self.size.div_ceil(EXTENT) as u32;
        let mut bytes = vec![0u8; (MAP_HEADER + 4 * u64::from(extents)) as usize];
        // SAFETY: slot 0 is mapped and at least this long (create checked
        // the extent count against it); the buffer is ours.
        checked(
            unsafe { result::memcpy_dtoh_sync(&mut bytes, self.base) },
            "reading the extent map",
        )?;
        let recorded = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default());
        if bytes[..8] != MAP_MAGIC || recorded != u64::from(extents) {
            return Err(StoreError::Invalid(format!(
                "the imported VRAM holds no extent map for a {} MiB device (left by an older vramblk?)",
                self.size >> 20
            )));
        }
        let flags = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or_default());
        if flags != self.header_flags() {
            let on_off = |f: u64| {
                if f & HEADER_INTEGRITY != 0 {
                    "on"
                } else {
                    "off"
                }
            };
            return Err(StoreError::Invalid(format!(
                "the imported VRAM was laid out with integrity {}, this server has it {}",
                on_off(flags),
                on_off(self.header_flags())
            )));
        }
        let entries: Vec<u32> = bytes[MAP_HEADER as usize..]
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        let held = self.held_slots();
        let reserved = reserved_for(self.size, self.integrity);
        self.extents = Arc::new(
            ExtentMap::from_entries(&entries, self.slots, held, reserved)
                .map_err(|e| StoreError::Invalid(format!("the imported extent map: {e}")))?,
        );
        Ok(())
    }
}
