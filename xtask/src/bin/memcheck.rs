//! Guest-side helper for the swap test: fills MiB of anonymous memory with
//! incompressible data derived from each page's index, then reads every
//! byte back and counts pages that differ. Exit 0 only when none do.
//!
//! With `--hold FILE`, after writing the first pass it waits until FILE
//! exists before reading back (its pages meanwhile sit in swap, for tests
//! that act on the swap device while they do).
//!
//! With `--until FILE`, it goes on with more passes after PASSES until FILE
//! exists (for tests that act on the swap device as long as they need),
//! finishing the pass it is in.
//!
//! With `--compressible`, pages compress as real memory does instead: one
//! in eight all zero (same-filled), the rest repeating three words of
//! their own between random ones (about 3:1 under LZ4), still different for
//! every page and pass.
//!
//! With `--pages FILE`, pages are FILE's pages (raw 4 KiB pages: a sample
//! of the corpus, `cargo xtask corpus`), page i of pass p being FILE's page
//! (i + p * 7919) mod its page count: real memory's content, repeated
//! (swap does not share equal pages), and different in every pass.
//!
//! usage: `memcheck MIB [PASSES] [--hold FILE] [--until FILE] [--compressible | --pages FILE]`

use std::process::ExitCode;

const PAGE: usize = 4096;

fn page_words(index: usize, pass: u64, out: &mut [u64]) {
    // xorshift64*, seeded per page: cheap and incompressible.
    let mut x = (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ pass.wrapping_mul(0xD1B5_4A32_D192_ED03)
        | 1;
    for w in out.iter_mut() {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *w = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
    }
}

/// [`page_words`] for `--compressible`.
fn compressible_words(index: usize, pass: u64, out: &mut [u64]) {
    if index % 8 == 7 {
        out.fill(0);
        return;
    }
    page_words(index, pass, out);
    let base = (index as u64) << 20 | pass << 4;
    for (i, w) in out.iter_mut().enumerate() {
        if i % 4 != 0 {
            *w = base | (i % 4) as u64;
        }
    }
}

/// What page i of pass p holds, written into the slice.
type PageFill = dyn Fn(usize, u64, &mut [u64]);

/// Pages read from a file, for `--pages`.
struct CorpusPages {
    words: Vec<u64>,
}

/// How far apart one pass's page i and the next pass's are in the file.
const PASS_STRIDE: usize = 7919;

impl CorpusPages {
    fn fill(&self, index: usize, pass: u64, out: &mut [u64]) {
        let words = PAGE / 8;
        let count = self.words.len() / words;
        let at = (index + pass as usize * PASS_STRIDE) % count;
        out.copy_from_slice(&self.words[at * words..(at + 1) * words]);
    }
}

/// `path`'s whole pages; an error for a file of none, or of a part page.
fn corpus_pages(path: &std::path::Path) -> Result<CorpusPages, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    if bytes.is_empty() || bytes.len() % PAGE != 0 {
        return Err(format!(
            "{} bytes: not a whole number of 4 KiB pages",
            bytes.len()
        ));
    }
    let words = bytes
        .chunks_exact(8)
        .map(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")))
        .collect();
    Ok(CorpusPages { words })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(mib) = args.get(1).and_then(|a| a.parse::<usize>().ok()) else {
        eprintln!("usage: memcheck MIB [PASSES]");
        return ExitCode::from(2);
    };
    let passes: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1);
    let file_after = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(std::path::PathBuf::from)
    };
    let fill: Box<PageFill> = if let Some(f) = file_after("--pages") {
        match corpus_pages(&f) {
            Ok(pages) => Box::new(move |i, pass, out| pages.fill(i, pass, out)),
            Err(e) => {
                eprintln!("memcheck: --pages {}: {e}", f.display());
                return ExitCode::from(2);
            }
        }
    } else if args.iter().any(|a| a == "--compressible") {
        Box::new(compressible_words)
    } else {
        Box::new(page_words)
    };
    let hold = file_after("--hold");
    let until = file_after("--until");
    let pages = mib * 256;
    let words_per_page = PAGE / 8;
    let mut mem: Vec<u64> = Vec::new();
    if mem.try_reserve_exact(pages * words_per_page).is_err() {
        eprintln!("memcheck: cannot reserve {mib} MiB");
        return ExitCode::from(3);
    }
    mem.resize(pages * words_per_page, 0);
    let mut want = vec![0u64; words_per_page];
    let mut bad_pages = 0usize;
    let mut pass = 0;
    while pass < passes || until.as_ref().is_some_and(|f| !f.exists()) {
        for (i, page) in mem.chunks_exact_mut(words_per_page).enumerate() {
            fill(i, pass, page);
        }
        println!("memcheck: pass {pass}: wrote {mib} MiB");
        if let (0, Some(f)) = (pass, &hold) {
            println!("memcheck: holding until {} exists", f.display());
            while !f.exists() {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
        for (i, page) in mem.chunks_exact(words_per_page).enumerate() {
            fill(i, pass, &mut want);
            if page != want.as_slice() {
                bad_pages += 1;
                if bad_pages <= 5 {
                    eprintln!("memcheck: page {i} differs");
                }
            }
        }
        println!("memcheck: pass {pass}: verified {pages} pages, {bad_pages} differ so far");
        pass += 1;
    }
    let passes = pass;
    if bad_pages == 0 {
        println!("memcheck: ok, {mib} MiB x {passes} passes, 0 pages differ");
        ExitCode::SUCCESS
    } else {
        println!("memcheck: FAILED, {bad_pages} pages differ");
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_pages_repeat_the_file_and_shift_every_pass() {
        let path = std::env::temp_dir().join(format!("memcheck-pages-{}", std::process::id()));
        // Three pages, each filled with its own byte.
        let file: Vec<u8> = (0..3u8).flat_map(|b| vec![b + 1; PAGE]).collect();
        std::fs::write(&path, &file).unwrap();
        let pages = corpus_pages(&path).unwrap();
        let first_byte = |i, pass| {
            let mut out = vec![0u64; PAGE / 8];
            pages.fill(i, pass, &mut out);
            assert!(out.iter().all(|&w| w == out[0]), "a whole page of the file");
            out[0].to_ne_bytes()[0]
        };
        assert_eq!(
            [first_byte(0, 0), first_byte(1, 0), first_byte(2, 0)],
            [1, 2, 3]
        );
        assert_eq!(first_byte(3, 0), 1, "past the end: from the start again");
        // Pass 1 starts 7919 pages on: 7919 % 3 == 2.
        assert_eq!(first_byte(0, 1), 3);
        std::fs::write(&path, vec![0u8; PAGE + 1]).unwrap();
        assert!(corpus_pages(&path).is_err(), "a part page is refused");
        std::fs::write(&path, b"").unwrap();
        assert!(corpus_pages(&path).is_err(), "an empty file is refused");
        let _ = std::fs::remove_file(&path);
    }
}
