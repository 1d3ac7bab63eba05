//! The page format of a compressed vramblk store (issue 18), on the CPU.
//!
//! Every 4 KiB page is stored one of three ways: a same-filled page as its
//! word alone (no VRAM), a page that shrinks as an LZ4 block in a slot of
//! its size class, any other page whole. This crate is the reference for
//! that format: the GPU kernels (cuda-store/kernels/page_lz.cu) must give
//! byte for byte what [`lz::compress`] gives, and whatever either encoded
//! [`lz::decompress`] decodes; the stand-in libcuda runs this same format
//! on the CPU, so the kernel path in the VM exercises it too.
//!
//! Why LZ4's block format: measured on real swap content (`cargo xtask
//! corpus`, docs/benchmarks.md), a byte-oriented LZ scheme without an
//! entropy stage reaches zram lz4's ratio and fits one SM thread per page;
//! keeping LZ4's exact block layout lets an independent decoder (the
//! lz4_flex crate, in tests) check every block this crate or the GPU
//! writes, and lets a server encode the pages of a lone write with LZ4's
//! own, faster search ([`encode_page_quick`]).

pub mod classes;
pub mod lz;
mod same;

pub use classes::{class_of, Class, CLASSES, CLASS_STEP};
pub use same::{fill, same_filled};

/// Bytes of a page: the unit a compressed store maps (the swap page).
pub const PAGE: usize = 4096;

/// How one page is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Every 8-byte word of the page is this one: kept in the map only.
    Same(u64),
    /// The page shrank to this many bytes of LZ4 block (in `out`).
    Compressed(usize),
    /// The page did not shrink enough to save a slot: stored whole.
    Raw,
}

/// Encodes one page: same-filled, compressed into `out` (at least
/// [`lz::MAX_COMPRESSED`] bytes), or raw when the compressed block would
/// take a slot no smaller than the page.
pub fn encode_page(page: &[u8; PAGE], out: &mut [u8]) -> Stored {
    if let Some(word) = same_filled(page) {
        return Stored::Same(word);
    }
    match lz::compress(page, out) {
        Some(len) => Stored::Compressed(len),
        None => Stored::Raw,
    }
}

/// Encodes one page as [`encode_page`] does, with LZ4's own search (the
/// C library's `LZ4_compress_default`) instead of the GPU's: for the pages
/// the CPU encodes one or two at a time, where a write waits for it. It is
/// about 3x as fast on a CPU for blocks about 5% larger (on the corpus,
/// lz4_flex's search, the same: 705 against 216 MB/s a core, 2.62x against
/// 2.77x); both are LZ4 blocks, which [`lz::decompress`] and the GPU's
/// decompress kernel read alike. It allocates nothing (the library keeps
/// its state on the stack): a server serving swap calls it. (lz4_flex's
/// encoder allocates its table on every call, which engine-bench's
/// allocation check caught.)
pub fn encode_page_quick(page: &[u8; PAGE], out: &mut [u8]) -> Stored {
    if let Some(word) = same_filled(page) {
        return Stored::Same(word);
    }
    let room = out.len().min(lz::MAX_COMPRESSED);
    // SAFETY: the library reads the page's PAGE bytes and writes at most
    // `room` bytes into `out`, which has that many; neither is kept.
    let len = unsafe {
        lz4_sys::LZ4_compress_default(
            page.as_ptr().cast(),
            out.as_mut_ptr().cast(),
            PAGE as i32,
            room as i32,
        )
    };
    // 0: the block would not fit in `room` (nor then save a slot).
    match usize::try_from(len) {
        Ok(n) if n > 0 && n <= room => Stored::Compressed(n),
        _ => Stored::Raw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_blocks_decode_as_the_reference_reads_them() {
        let mut out = [0u8; lz::MAX_COMPRESSED];
        let mut page = [0u8; PAGE];
        let mut compressed = 0;
        for (n, sample) in lz::tests::sample_pages().iter().enumerate() {
            let stored = encode_page_quick(sample, &mut out);
            assert_eq!(
                std::mem::discriminant(&stored),
                std::mem::discriminant(&encode_page(sample, &mut [0u8; lz::MAX_COMPRESSED])),
                "page {n}: the same kind either way"
            );
            if let Stored::Compressed(len) = stored {
                lz::decompress(&out[..len], &mut page).unwrap();
                assert_eq!(&page, sample, "page {n}");
                compressed += 1;
            }
        }
        assert!(compressed >= 4, "{compressed} of the samples compressed");
        assert_eq!(
            encode_page_quick(&[7; PAGE], &mut out),
            Stored::Same(0x0707_0707_0707_0707)
        );
        // A caller's buffer too small for the block: stored raw, not cut.
        let mut small = [0u8; 16];
        assert_eq!(
            encode_page_quick(&lz::tests::sample_pages()[0], &mut small),
            Stored::Raw
        );
    }

    #[test]
    fn pages_are_stored_by_what_they_hold() {
        let mut out = [0u8; lz::MAX_COMPRESSED];
        assert_eq!(encode_page(&[0; PAGE], &mut out), Stored::Same(0));
        let mut text = [0u8; PAGE];
        for (i, b) in text.iter_mut().enumerate() {
            *b = b"swap pages of a shell: "[i % 23];
        }
        match encode_page(&text, &mut out) {
            Stored::Compressed(len) => assert!(len < 200, "{len}"),
            other => panic!("{other:?}"),
        }
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let random: Vec<u8> = (0..PAGE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(
            encode_page(random.as_slice().try_into().unwrap(), &mut out),
            Stored::Raw
        );
    }
}
