//! The page codec: one 4 KiB page as one LZ4 block (the LZ4 block format,
//! so any LZ4 decoder reads it), found by a greedy search in two passes
//! that a GPU warp runs 32 positions at a time.
//!
//! The encoder is deterministic and the GPU kernel (cuda-store/kernels/
//! page_lz.cu) runs the same steps, so the two give identical bytes and the
//! tests compare them byte for byte:
//! 1. candidates: for every position that may start a match, the last
//!    earlier position whose 4 bytes hash alike ([`HASH_BITS`] bits).
//!    Every position is indexed, those inside matches too, which is what
//!    lets a warp hash 32 positions at once.
//! 2. parse, in [`SEGMENT`]-byte pieces of the page that the GPU parses at
//!    once, a warp each: in a piece, from the left, the first position
//!    with a match starts one: of its candidate, its candidate's
//!    candidate, ... ([`CHAIN`] of them), those whose 4 bytes are its own,
//!    the one reaching furthest (the nearest of equals), extended
//!    backwards over the piece's pending literals; matches stay inside
//!    their piece and end at LZ4's end limit at the latest. The parse goes
//!    on after the match. A match may refer to any earlier byte of the
//!    page, in another piece too: only the search is cut, not the window.
//!
//! Change a step here and the kernel must change with it (the GPU check in
//! engine-bench compares them).

use crate::PAGE;

/// Bits of the hash table (entries = 2^bits, 2 bytes each): 4 KiB of
/// shared memory per page on the GPU. Measured on the corpus's programs
/// (`cargo xtask corpus`, a chain of 1): 10 bits 2.46x, 11 bits 2.48x, 12
/// bits 2.49x for twice the memory.
pub const HASH_BITS: u32 = 11;

/// The largest block kept: a larger one would need a slot as big as the
/// page (the last size class, crate::classes).
pub const MAX_COMPRESSED: usize = PAGE - crate::CLASS_STEP;

/// LZ4's rules for the end of a block: the last match starts at least 12
/// bytes before the end, and the last 5 bytes are literals.
const MF_LIMIT: usize = 12;
const LAST_LITERALS: usize = 5;
const MIN_MATCH: usize = 4;
const EMPTY: u16 = u16::MAX;

/// Why a block could not be decoded: stored data was damaged (the
/// per-page checksum normally says so first) or was never a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Corrupt {
    #[error("the block ends inside a sequence (at byte {0})")]
    Truncated(usize),
    #[error("a match refers {offset} bytes back from byte {at} of the page")]
    BadOffset { offset: usize, at: usize },
    #[error("the block describes more than a page")]
    Overrun,
    #[error("the block gives {0} bytes, not a page")]
    Short(usize),
}

fn read32(p: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]])
}

fn hash(seq: u32) -> usize {
    (seq.wrapping_mul(2_654_435_761) >> (32 - HASH_BITS)) as usize
}

/// Appends to the output, refusing to pass `limit`.
struct Writer<'a> {
    out: &'a mut [u8],
    pos: usize,
    limit: usize,
}

impl Writer<'_> {
    fn byte(&mut self, b: u8) -> Option<()> {
        if self.pos >= self.limit {
            return None;
        }
        self.out[self.pos] = b;
        self.pos += 1;
        Some(())
    }

    fn bytes(&mut self, b: &[u8]) -> Option<()> {
        let end = self.pos.checked_add(b.len()).filter(|&e| e <= self.limit)?;
        self.out[self.pos..end].copy_from_slice(b);
        self.pos = end;
        Some(())
    }

    /// A length beyond the token's 15: bytes of 255, then the rest.
    fn length(&mut self, mut n: usize) -> Option<()> {
        while n >= 255 {
            self.byte(255)?;
            n -= 255;
        }
        self.byte(n as u8)
    }

    fn sequence(&mut self, literals: &[u8], offset: usize, match_len: usize) -> Option<()> {
        let ml = match_len - MIN_MATCH;
        self.byte(((literals.len().min(15) as u8) << 4) | ml.min(15) as u8)?;
        if literals.len() >= 15 {
            self.length(literals.len() - 15)?;
        }
        self.bytes(literals)?;
        self.bytes(&(offset as u16).to_le_bytes())?;
        if ml >= 15 {
            self.length(ml - 15)?;
        }
        Some(())
    }

    fn last_literals(&mut self, literals: &[u8]) -> Option<()> {
        self.byte((literals.len().min(15) as u8) << 4)?;
        if literals.len() >= 15 {
            self.length(literals.len() - 15)?;
        }
        self.bytes(literals)
    }
}

/// Positions a match may start at: LZ4's last match starts at least
/// MF_LIMIT bytes before the end.
const MATCH_STARTS: usize = PAGE - MF_LIMIT;

/// Pass 1: each position's candidate, the last earlier position with the
/// same hash (EMPTY for none).
fn candidates(page: &[u8; PAGE]) -> [u16; MATCH_STARTS] {
    let mut table = [EMPTY; 1 << HASH_BITS];
    let mut candidates = [EMPTY; MATCH_STARTS];
    for (i, c) in candidates.iter_mut().enumerate() {
        let h = hash(read32(page, i));
        *c = table[h];
        table[h] = i as u16;
    }
    candidates
}

/// How many candidates a position tries: its own, its candidate's, ...
/// Measured on the corpus's programs (11 hash bits): 1: 2.48x, 2: 2.61x,
/// 4: 2.69x, 8: 2.74x, 16: 2.78x (lz4_flex 2.53x); each doubling costs
/// the CPU a quarter of its speed and the GPU warp as much.
pub const CHAIN: usize = 4;

/// Bytes of a page one GPU warp parses: the page's four pieces are parsed
/// at once (one page 257 -> 106 us on the H200, 2026-12-04). The ratio on
/// the corpus's programs (`cargo xtask corpus`) went 2.78x -> 2.77x, as
/// matches no longer cross 1 KiB lines; 2 KiB pieces were slower on the
/// GPU (docs/benchmarks.md).
pub const SEGMENT: usize = 1024;

/// Where the match starting at `i` ends (at `limit` at the latest), for the
/// first of the longest among the CHAIN candidates whose 4 bytes equal the
/// position's, and its offset.
fn longest_match(
    page: &[u8; PAGE],
    candidates: &[u16],
    i: usize,
    limit: usize,
) -> Option<(usize, usize)> {
    let seq = read32(page, i);
    let mut best: Option<(usize, usize)> = None;
    let mut c = candidates[i];
    for _ in 0..CHAIN {
        if c == EMPTY {
            break;
        }
        let from = usize::from(c);
        if read32(page, from) == seq {
            let offset = i - from;
            let mut end = i + MIN_MATCH;
            while end < limit && page[end] == page[end - offset] {
                end += 1;
            }
            if best.is_none_or(|(_, e)| end > e) {
                best = Some((offset, end));
            }
        }
        c = candidates[from];
    }
    best
}

/// Compresses `page` into `out`; the block's length, or None when it would
/// pass [`MAX_COMPRESSED`] (or `out`'s length): the page is stored whole.
pub fn compress(page: &[u8; PAGE], out: &mut [u8]) -> Option<usize> {
    let limit = MAX_COMPRESSED.min(out.len());
    let mut w = Writer { out, pos: 0, limit };
    let candidates = candidates(page);
    let mut anchor = 0usize;
    for piece in (0..PAGE).step_by(SEGMENT) {
        // A piece's matches end inside it, so no match starts in its last
        // MIN_MATCH - 1 bytes.
        let limit = (piece + SEGMENT).min(PAGE - LAST_LITERALS);
        let starts = MATCH_STARTS.min(limit + 1 - MIN_MATCH);
        // Backwards extension stops at the piece's start: what lies before
        // it was parsed by another warp.
        let (mut floor, mut i) = (piece, piece);
        while i < starts {
            let Some((offset, end)) = longest_match(page, &candidates, i, limit) else {
                i += 1;
                continue;
            };
            let mut start = i;
            while start > floor && start > offset && page[start - 1] == page[start - 1 - offset] {
                start -= 1;
            }
            w.sequence(&page[anchor..start], offset, end - start)?;
            i = end;
            anchor = end;
            floor = end;
        }
    }
    w.last_literals(&page[anchor..])?;
    Some(w.pos)
}

/// Decodes one block into `page`, which it must fill exactly.
pub fn decompress(block: &[u8], page: &mut [u8; PAGE]) -> Result<(), Corrupt> {
    let (mut ip, mut op) = (0usize, 0usize);
    let byte = |ip: &mut usize| -> Result<usize, Corrupt> {
        let b = *block.get(*ip).ok_or(Corrupt::Truncated(*ip))?;
        *ip += 1;
        Ok(usize::from(b))
    };
    let length = |ip: &mut usize, mut n: usize| -> Result<usize, Corrupt> {
        loop {
            let b = byte(ip)?;
            n += b;
            if n > PAGE {
                return Err(Corrupt::Overrun);
            }
            if b != 255 {
                return Ok(n);
            }
        }
    };
    loop {
        let token = byte(&mut ip)?;
        let mut literals = token >> 4;
        if literals == 15 {
            literals = length(&mut ip, literals)?;
        }
        let from = block
            .get(ip..ip + literals)
            .ok_or(Corrupt::Truncated(block.len()))?;
        page.get_mut(op..op + literals)
            .ok_or(Corrupt::Overrun)?
            .copy_from_slice(from);
        ip += literals;
        op += literals;
        if ip == block.len() {
            break;
        }
        let offset = byte(&mut ip)? | byte(&mut ip)? << 8;
        if offset == 0 || offset > op {
            return Err(Corrupt::BadOffset { offset, at: op });
        }
        let mut len = token & 15;
        if len == 15 {
            len = length(&mut ip, len)?;
        }
        len += MIN_MATCH;
        if op + len > PAGE {
            return Err(Corrupt::Overrun);
        }
        // Byte by byte: a match may overlap what it produces.
        for k in op..op + len {
            page[k] = page[k - offset];
        }
        op += len;
    }
    if op != PAGE {
        return Err(Corrupt::Short(op));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Pages of the shapes swap holds: text, a table of small integers,
    /// pointers, a runs-and-noise mix, noise; and the edge shapes: a match
    /// running into the last bytes, a page one byte from same-filled.
    pub(crate) fn sample_pages() -> Vec<[u8; PAGE]> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut pages = Vec::new();
        let mut p = [0u8; PAGE];
        let words = ["swap", "page ", "vram", "the ", "kernel ", "queue", "\n"];
        let mut k = 0;
        for b in p.iter_mut() {
            let w = words[(k / 5) % words.len()].as_bytes();
            *b = w[k % w.len()];
            k += 1 + (rand() % 3 == 0) as usize;
        }
        pages.push(p);
        for (i, w) in p.chunks_exact_mut(4).enumerate() {
            w.copy_from_slice(&((i as u32 / 3) % 50).to_le_bytes());
        }
        pages.push(p);
        for w in p.chunks_exact_mut(8) {
            w.copy_from_slice(&(0x7f00_0000_0000u64 + (rand() % 64) * 16).to_le_bytes());
        }
        pages.push(p);
        for (i, b) in p.iter_mut().enumerate() {
            *b = if (i / 64) % 3 == 0 {
                rand() as u8
            } else {
                (i / 64) as u8
            };
        }
        pages.push(p);
        for b in p.iter_mut() {
            *b = rand() as u8;
        }
        pages.push(p);
        let mut q = [7u8; PAGE];
        q[0] = 1;
        pages.push(q);
        let mut q = [0u8; PAGE];
        q[PAGE - 1] = 9;
        pages.push(q);
        for b in q[..100].iter_mut() {
            *b = rand() as u8;
        }
        pages.push(q);
        pages
    }

    #[test]
    fn every_page_comes_back_as_it_was_and_lz4_reads_the_blocks() {
        for (n, page) in sample_pages().iter().enumerate() {
            let mut out = [0u8; PAGE];
            let Some(len) = compress(page, &mut out) else {
                assert_eq!(n, 4, "only the noise page stays whole");
                continue;
            };
            let mut back = [0u8; PAGE];
            decompress(&out[..len], &mut back).unwrap();
            assert_eq!(&back, page, "page {n}");
            // An independent decoder reads the same block.
            let theirs = lz4_flex::block::decompress(&out[..len], PAGE).unwrap();
            assert_eq!(&theirs[..], &page[..], "page {n} through lz4_flex");
        }
    }

    /// Pages stitched from pieces of every kind at random lengths: runs,
    /// copies of earlier bytes at random distances (overlapping ones too),
    /// noise, near the end of the page above all, where LZ4's end rules
    /// bite.
    #[test]
    fn thousands_of_stitched_pages_come_back_through_both_decoders() {
        let mut x = 0x1234_5678_9ABC_DEF1u64;
        let mut rand = move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let (mut compressed, mut whole) = (0, 0);
        for n in 0..3000 {
            let mut page = [0u8; PAGE];
            let mut at = 0;
            while at < PAGE {
                let len = (1 + rand(300)).min(PAGE - at);
                // One page in ten is noise alone: it must be stored whole.
                match if n % 10 == 0 { 2 } else { rand(4) } {
                    0 => page[at..at + len].fill(rand(256) as u8),
                    1 if at > 0 => {
                        let back = 1 + rand(at);
                        for k in at..at + len {
                            page[k] = page[k - back];
                        }
                    }
                    2 => {
                        for b in &mut page[at..at + len] {
                            *b = rand(256) as u8;
                        }
                    }
                    _ => {
                        for b in &mut page[at..at + len] {
                            *b = b"abcab"[rand(5)];
                        }
                    }
                }
                at += len;
            }
            let mut out = [0u8; PAGE];
            let Some(len) = compress(&page, &mut out) else {
                whole += 1;
                continue;
            };
            compressed += 1;
            assert!(len <= MAX_COMPRESSED);
            let mut back = [0u8; PAGE];
            decompress(&out[..len], &mut back).unwrap();
            assert_eq!(back, page);
            let theirs = lz4_flex::block::decompress(&out[..len], PAGE).unwrap();
            assert_eq!(&theirs[..], &page[..]);
        }
        assert!(
            compressed > 2500 && whole >= 300,
            "{compressed} compressed, {whole} whole"
        );
    }

    #[test]
    fn blocks_other_encoders_write_decode_too() {
        for page in sample_pages() {
            let theirs = lz4_flex::block::compress(&page);
            let mut back = [0u8; PAGE];
            decompress(&theirs, &mut back).unwrap();
            assert_eq!(back, page);
        }
    }

    #[test]
    fn a_block_too_large_for_a_slot_is_refused() {
        let pages = sample_pages();
        let noise = &pages[4];
        assert_eq!(compress(noise, &mut [0u8; PAGE]), None);
        // A small output buffer is a limit too, never a panic.
        assert_eq!(compress(&pages[0], &mut [0u8; 8]), None);
    }

    #[test]
    fn damaged_blocks_are_errors_never_panics_or_short_pages() {
        let mut out = [0u8; PAGE];
        let page = &sample_pages()[0];
        let len = compress(page, &mut out).unwrap();
        let block = &out[..len];
        let mut back = [0u8; PAGE];
        assert!(decompress(&block[..len - 1], &mut back).is_err());
        assert_eq!(decompress(&[], &mut back), Err(Corrupt::Truncated(0)));
        // Literals only, too few.
        assert_eq!(
            decompress(&[0x30, 1, 2, 3], &mut back),
            Err(Corrupt::Short(3))
        );
        // A match reaching before the page.
        assert_eq!(
            decompress(&[0x10, 1, 5, 0, 0x00], &mut back),
            Err(Corrupt::BadOffset { offset: 5, at: 1 })
        );
        // Every single-byte change: an error or some page, never a panic.
        for i in 0..len {
            for bit in [1u8, 0x80] {
                let mut bad = block.to_vec();
                bad[i] ^= bit;
                let _ = decompress(&bad, &mut back);
            }
        }
        // Lengths that run past the page.
        let mut long = vec![0xF0u8];
        long.extend(std::iter::repeat_n(255u8, 40));
        assert_eq!(decompress(&long, &mut back), Err(Corrupt::Overrun));
    }

    /// The matches of a block: where in the page each starts, its length
    /// and its offset.
    fn matches_of(block: &[u8]) -> Vec<(usize, usize, usize)> {
        let (mut ip, mut op, mut out) = (0, 0, Vec::new());
        let length = |ip: &mut usize, mut n: usize| loop {
            let b = usize::from(block[*ip]);
            *ip += 1;
            n += b;
            if b != 255 {
                return n;
            }
        };
        loop {
            let token = usize::from(block[ip]);
            ip += 1;
            let mut lit = token >> 4;
            if lit == 15 {
                lit = length(&mut ip, lit);
            }
            ip += lit;
            op += lit;
            if ip == block.len() {
                return out;
            }
            let offset = usize::from(block[ip]) | usize::from(block[ip + 1]) << 8;
            ip += 2;
            let mut len = token & 15;
            if len == 15 {
                len = length(&mut ip, len);
            }
            out.push((op, len + MIN_MATCH, offset));
            op += len + MIN_MATCH;
        }
    }

    /// The GPU parses a page's pieces at once, so no match may cross from
    /// one piece into the next; a match may still refer to an earlier
    /// piece, and long runs across the lines are matched piece by piece.
    #[test]
    fn no_match_crosses_a_piece_line_but_matches_reach_back_across_them() {
        let mut pages = sample_pages();
        pages.push([b'z'; PAGE]);
        pages[8][0] = 1;
        let mut text = [0u8; PAGE];
        for (i, b) in text.iter_mut().enumerate() {
            *b = b"a line of text that repeats, "[i % 29];
        }
        pages.push(text);
        let mut reaching_back = 0;
        for (n, page) in pages.iter().enumerate() {
            let mut out = [0u8; PAGE];
            let Some(len) = compress(page, &mut out) else {
                continue;
            };
            let matches = matches_of(&out[..len]);
            for &(at, len, offset) in &matches {
                assert_eq!(
                    at / SEGMENT,
                    (at + len - 1) / SEGMENT,
                    "page {n}: {at}+{len}"
                );
                reaching_back += usize::from(at - offset < at / SEGMENT * SEGMENT);
            }
            // A run over the whole page is a match in every piece.
            if n == 8 || n == 9 {
                assert_eq!(matches.len(), PAGE / SEGMENT, "page {n}: {matches:?}");
                assert!(len < 100, "page {n}: {len} bytes");
            }
        }
        assert!(reaching_back > 0);
    }

    #[test]
    fn the_encoder_is_deterministic() {
        for page in sample_pages() {
            let (mut a, mut b) = ([0u8; PAGE], [1u8; PAGE]);
            assert_eq!(compress(&page, &mut a), compress(&page, &mut b));
            let len = compress(&page, &mut a).unwrap_or(0);
            assert_eq!(a[..len], b[..len]);
        }
    }
}
