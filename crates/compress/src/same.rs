//! Same-filled pages: every 8-byte word equal (zram's `same_pages`; zero
//! pages above all). They cost a map entry and no VRAM.

use crate::PAGE;

/// The word a same-filled page repeats (native byte order), if it is one.
pub fn same_filled(page: &[u8; PAGE]) -> Option<u64> {
    let mut words = page
        .chunks_exact(8)
        .map(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]));
    let first = words.next()?;
    words.all(|w| w == first).then_some(first)
}

/// Fills `page` with `word` repeated: what reading a same-filled page gives.
pub fn fill(page: &mut [u8; PAGE], word: u64) {
    for w in page.chunks_exact_mut(8) {
        w.copy_from_slice(&word.to_ne_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_filled_pages_are_found_by_their_words_and_filled_back() {
        assert_eq!(same_filled(&[0u8; PAGE]), Some(0));
        let mut p = [0xABu8; PAGE];
        assert_eq!(same_filled(&p), Some(0xABAB_ABAB_ABAB_ABAB));
        p[PAGE - 1] = 0;
        assert_eq!(same_filled(&p), None, "one byte differs at the end");
        // A repeated word, not only a repeated byte.
        let mut q = [0u8; PAGE];
        for (i, b) in q.iter_mut().enumerate() {
            *b = (i % 8) as u8 * 17;
        }
        let word = same_filled(&q).expect("a repeated 8-byte word");
        let mut back = [0xFFu8; PAGE];
        fill(&mut back, word);
        assert_eq!(back, q);
        // Equal 4-byte halves do not make a word pattern of a different page.
        q[8] ^= 1;
        assert_eq!(same_filled(&q), None);
    }
}
