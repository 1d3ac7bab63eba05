//! Per-page integrity: every 4 KiB page in VRAM has a 4-byte checksum in
//! VRAM beside the data, computed on the GPU in the round that writes the
//! page and checked on the GPU in the round that reads it.
//!
//! The checksum is CRC32C (the Castagnoli polynomial, as iSCSI, ext4 and
//! btrfs use) without the initial and final inversion: at a fixed 4 KiB
//! length the inversion adds no strength, and without it a zero page's
//! checksum is zero, so zeroed VRAM (a fresh, discarded or erased extent)
//! with zeroed checksums reads back clean. Over 4 KiB CRC32C detects every
//! error of up to 3 bits and every burst of up to 32 bits, and any other
//! error with probability 1 - 2^-32.
//!
//! The GPU computes a page's CRC in parallel: thread t of the block holds
//! the page's 16 bytes at 16t, computes their CRC with slicing-by-4 tables,
//! multiplies it by x^(8 * (4096 - 16 (t + 1))) modulo the polynomial (the
//! shift past the bytes that follow), and the block XORs the 256 results.
//! This module holds that arithmetic on the CPU: the tables the kernel
//! uses, and the reference the tests check the GPU (and the stand-in
//! libcuda) against.
//!
//! Layout: the checksums are kept per extent (2 KiB for its 512 pages) in
//! the slots after the map's, so moving an extent to another slot moves no
//! checksum; unmapping an extent zeroes its checksums with its slot.

use crate::extents::{slot_addr, EXTENT, MAP_SLOT};

/// Bytes a checksum covers.
pub const PAGE: u64 = 4096;

/// Bytes of checksums one extent has.
pub(crate) const SUMS_PER_EXTENT: u64 = EXTENT / PAGE * 4;

/// CRC32C's polynomial, bit-reversed (the bit for x^0 is the top bit).
const POLY: u32 = 0x82f6_3b78;

/// Threads of the kernel that share one page (16 bytes each).
pub(crate) const LANES: usize = (PAGE / 16) as usize;

/// Slots the checksums of `extents` extents take.
pub(crate) fn sum_slots(extents: u32) -> u32 {
    (u64::from(extents) * SUMS_PER_EXTENT).div_ceil(EXTENT) as u32
}

/// Where the checksum of the page at byte `within` of extent `e` lives, in
/// VRAM mapped at `base` (the checksum slots follow the map's).
pub(crate) fn sum_addr(base: u64, e: u32, within: u64) -> u64 {
    slot_addr(base, MAP_SLOT + 1) + u64::from(e) * SUMS_PER_EXTENT + within / PAGE * 4
}

/// The table for one byte: `T[b]` is the CRC of byte `b`.
fn byte_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    for (b, entry) in t.iter_mut().enumerate() {
        let mut c = b as u32;
        for _ in 0..8 {
            c = (c >> 1) ^ (POLY & (c & 1).wrapping_neg());
        }
        *entry = c;
    }
    t
}

/// The slicing-by-4 tables, one after the other: table k gives the CRC of
/// a byte followed by k zero bytes.
pub(crate) fn slicing_tables() -> [u32; 1024] {
    let t0 = byte_table();
    let mut t = [0u32; 1024];
    t[..256].copy_from_slice(&t0);
    for k in 1..4 {
        for b in 0..256 {
            let prev = t[(k - 1) * 256 + b];
            t[k * 256 + b] = (prev >> 8) ^ t0[(prev & 0xff) as usize];
        }
    }
    t
}

/// `a * b` modulo the polynomial, both bit-reversed.
pub(crate) fn multiply(a: u32, mut b: u32) -> u32 {
    let mut p = 0;
    for i in 0..32 {
        if a & (0x8000_0000 >> i) != 0 {
            p ^= b;
        }
        b = (b >> 1) ^ (POLY & (b & 1).wrapping_neg());
    }
    p
}

/// x^(8 n) modulo the polynomial, bit-reversed: what shifts a CRC past `n`
/// zero bytes.
pub(crate) fn shift_bytes(n: u64) -> u32 {
    // x^0 is the top bit; square-and-multiply over the bits of 8 n.
    let (mut result, mut square, mut e) = (0x8000_0000u32, 0x4000_0000u32, 8 * n);
    while e > 0 {
        if e & 1 == 1 {
            result = multiply(result, square);
        }
        square = multiply(square, square);
        e >>= 1;
    }
    result
}

/// Each lane's shift: lane t's 16 bytes are followed by 4096 - 16 (t + 1)
/// more of the page.
pub(crate) fn lane_shifts() -> [u32; LANES] {
    let mut s = [0u32; LANES];
    for (t, entry) in s.iter_mut().enumerate() {
        *entry = shift_bytes(PAGE - 16 * (t as u64 + 1));
    }
    s
}

/// The checksum of `page` on the CPU with the crc32c crate (the SSE4.2
/// crc32 instruction where the CPU has it): for pieces the copy engines
/// move, which no kernel touches. The crate computes CRC32C with the
/// inversions; starting it from !0 and inverting its answer takes them
/// out.
pub(crate) fn page_sum_cpu(page: &[u8]) -> u32 {
    !crc32c::crc32c_append(!0, page)
}

/// The checksum of `page` (any length), byte by byte: the reference.
pub fn page_sum(page: &[u8]) -> u32 {
    let t = byte_table();
    page.iter().fold(0u32, |c, &b| {
        (c >> 8) ^ t[((c ^ u32::from(b)) & 0xff) as usize]
    })
}

#[cfg(test)]
/// The checksum of a 4 KiB page the way the kernel computes it: per
/// 16-byte lane with the slicing tables, shifted, XORed together.
pub(crate) fn page_sum_by_lanes(page: &[u8; PAGE as usize]) -> u32 {
    let tables = slicing_tables();
    let shifts = lane_shifts();
    let mut sum = 0;
    for (t, lane) in page.chunks_exact(16).enumerate() {
        let mut c = 0u32;
        for w in lane.chunks_exact(4) {
            c ^= u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            c = tables[768 + (c & 0xff) as usize]
                ^ tables[512 + ((c >> 8) & 0xff) as usize]
                ^ tables[256 + ((c >> 16) & 0xff) as usize]
                ^ tables[(c >> 24) as usize];
        }
        sum ^= multiply(c, shifts[t]);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random_page(seed: u64) -> [u8; PAGE as usize] {
        let mut x = seed | 1;
        let mut p = [0u8; PAGE as usize];
        for b in p.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        p
    }

    #[test]
    fn the_reference_is_crc32c_without_the_inversions() {
        // CRC32C's check value: "123456789" gives 0xe3069283 with the
        // initial and final inversion. Without them the same register
        // starts at zero; starting it at !0 and inverting at the end must
        // give the standard value back.
        let t = byte_table();
        let standard = !b"123456789".iter().fold(!0u32, |c, &b| {
            (c >> 8) ^ t[((c ^ u32::from(b)) & 0xff) as usize]
        });
        assert_eq!(standard, 0xe306_9283);
        assert_eq!(page_sum(&[0u8; PAGE as usize]), 0, "a zero page sums to 0");
    }

    #[test]
    fn the_cpu_path_gives_the_reference_checksum() {
        for seed in [3u64, 42, 0xfeed] {
            let p = pseudo_random_page(seed);
            assert_eq!(page_sum_cpu(&p), page_sum(&p), "seed {seed}");
        }
        assert_eq!(page_sum_cpu(&[0u8; PAGE as usize]), 0);
    }

    #[test]
    fn lanes_combined_give_the_byte_by_byte_checksum() {
        for seed in [1u64, 7, 12345, 0xdead_beef] {
            let p = pseudo_random_page(seed);
            assert_eq!(page_sum_by_lanes(&p), page_sum(&p), "seed {seed}");
        }
        let mut one = [0u8; PAGE as usize];
        one[4095] = 0x80;
        assert_eq!(page_sum_by_lanes(&one), page_sum(&one));
    }

    #[test]
    fn any_single_bit_flip_changes_the_checksum() {
        let p = pseudo_random_page(99);
        let sum = page_sum(&p);
        for bit in (0..PAGE * 8).step_by(61) {
            let mut q = p;
            q[(bit / 8) as usize] ^= 1 << (bit % 8);
            assert_ne!(page_sum_by_lanes(&q), sum, "bit {bit}");
        }
    }

    #[test]
    fn checksums_sit_per_extent_after_the_map() {
        let base = 1u64 << 40;
        assert_eq!(sum_addr(base, 0, 0), base + EXTENT);
        assert_eq!(sum_addr(base, 0, PAGE), base + EXTENT + 4);
        assert_eq!(sum_addr(base, 1, 0), base + EXTENT + 2048);
        assert_eq!(sum_slots(0), 0);
        assert_eq!(sum_slots(1), 1);
        assert_eq!(sum_slots(1024), 1);
        assert_eq!(sum_slots(1025), 2);
        // 0.1% of the data: 2 KiB per 2 MiB extent.
        assert_eq!(SUMS_PER_EXTENT * 1024, EXTENT);
    }
}
