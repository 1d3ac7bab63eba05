//! The extent map in slot 0: written fresh for a new device, read back by
//! a server that recovers or takes over one, and the zeroing both need
//! (free slots are always zero).

use super::CudaStore;
use crate::driver::checked;
use crate::extents::{ExtentMap, EXTENT, MAP_HEADER};
use crate::packed::{page_map_addr, Packed};
use cudarc::driver::result;
use std::sync::Arc;
use vramblk_store::StoreError;

/// The map's header: magic, then the extent count (u64), then the layout's
/// flags (u64), then padding.
pub(super) const MAP_MAGIC: [u8; 8] = *b"VRAMBLK\x01";

/// Header flag: pages carry checksums (in the slots after the map's, or in
/// a compressed device's page map).
pub(super) const HEADER_INTEGRITY: u64 = 1;

/// Header flag: a compressed device (the map's extents are pool extents,
/// the slots after the map's hold the page map).
pub(super) const HEADER_COMPRESSED: u64 = 2;

impl CudaStore {
    /// A fresh device: every slot zero (a free slot always is), every
    /// extent unmapped, all slots held usable.
    pub(super) fn write_empty_map(&mut self) -> Result<(), StoreError> {
        let extents = self.layout().map_extents(self.size);
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
        let reserved = self.layout().reserved(self.size);
        self.extents = Arc::new(ExtentMap::with_reserved(
            extents, self.slots, held, reserved,
        ));
        if self.compress.is_on() {
            self.packed = Some(Arc::new(Packed::new(
                self.size,
                self.compress,
                self.integrity,
            )));
        }
        Ok(())
    }

    pub(super) fn header_flags(&self) -> u64 {
        let mut flags = 0;
        if self.integrity {
            flags |= HEADER_INTEGRITY;
        }
        if self.compress.is_on() {
            flags |= HEADER_COMPRESSED;
        }
        flags
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
        let extents = self.layout().map_extents(self.size);
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
            let says = |f: u64| {
                format!(
                    "integrity {}, compression {}",
                    if f & HEADER_INTEGRITY != 0 {
                        "on"
                    } else {
                        "off"
                    },
                    if f & HEADER_COMPRESSED != 0 {
                        "on"
                    } else {
                        "off"
                    }
                )
            };
            return Err(StoreError::Invalid(format!(
                "the imported VRAM was laid out with {}, this server has {}",
                says(flags),
                says(self.header_flags())
            )));
        }
        let entries: Vec<u32> = bytes[MAP_HEADER as usize..]
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        let held = self.held_slots();
        let reserved = self.layout().reserved(self.size);
        self.extents = Arc::new(
            ExtentMap::from_entries(&entries, self.slots, held, reserved)
                .map_err(|e| StoreError::Invalid(format!("the imported extent map: {e}")))?,
        );
        if self.compress.is_on() {
            self.read_page_map()?;
        }
        Ok(())
    }

    /// Reads back a compressed device's page map and rebuilds the pool
    /// from it; refuses a map that names slots no consistent map could.
    fn read_page_map(&mut self) -> Result<(), StoreError> {
        let pages = self.size.div_ceil(crate::PAGE) as usize;
        let mut raw = vec![[0u64; 2]; pages];
        // SAFETY: the page map's slots are reserved and held (allocation
        // keeps at least them); the buffer is ours and 16 bytes a page.
        checked(
            unsafe {
                result::memcpy_dtoh_sync(
                    std::slice::from_raw_parts_mut(raw.as_mut_ptr().cast::<u8>(), pages * 16),
                    page_map_addr(self.base, 0),
                )
            },
            "reading the page map",
        )?;
        let extents = Arc::clone(&self.extents);
        let packed = Packed::rebuilt(self.size, self.compress, self.integrity, raw, |e| {
            extents.slot_of(e).is_some()
        })
        .map_err(|e| StoreError::Invalid(format!("the imported page map: {e}")))?;
        let u = packed.usage();
        log::info!(
            "cuda store: page map read back: {} same-filled, {} compressed ({} KiB), {} whole pages",
            u.same_pages,
            u.compressed_pages,
            u.compressed_bytes >> 10,
            u.raw_pages
        );
        self.packed = Some(Arc::new(packed));
        Ok(())
    }
}
