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
//! writes.

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

#[cfg(test)]
mod tests {
    use super::*;

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
