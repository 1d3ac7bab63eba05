//! How well the corpus compresses page by page, as a swap store must (each
//! 4 KiB page on its own, as zram does): same-filled pages (every 8-byte
//! word equal: zram's `same_pages`, stored as the word alone), then LZ4
//! and zstd (levels 1 and 3) from the lz4_flex and zstd crates, and
//! vramblk's own page codec (vramblk-compress: the format and the search
//! the GPU kernels run), on this CPU, one thread. Each compressed page is
//! decompressed and compared, so a figure never comes from a codec that
//! lost data.

use super::capture::PAGE;
use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};

/// The codecs measured, in report order.
pub const CODECS: [Codec; 4] = [Codec::Lz4, Codec::Zstd(1), Codec::Zstd(3), Codec::Vramblk];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Lz4,
    Zstd(i32),
    /// vramblk-compress's LZ4 blocks (crates/compress).
    Vramblk,
}

impl Codec {
    pub fn name(self) -> String {
        match self {
            Codec::Lz4 => "lz4".into(),
            Codec::Zstd(l) => format!("zstd-{l}"),
            Codec::Vramblk => "vramblk".into(),
        }
    }
}

/// One source's pages, measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measured {
    pub pages: u64,
    /// Same-filled pages, and how many of those are zero.
    pub same: u64,
    pub zero: u64,
    /// Per codec (CODECS order): bytes stored for the pages that are not
    /// same-filled (a page that does not shrink is stored whole), and the
    /// time compressing them took.
    pub stored: [u64; CODECS.len()],
    /// The same in the size classes of vramblk-compress (slots of whole
    /// CLASS-byte steps; a block larger than the last class takes the
    /// whole page): what a compressed VRAM store holds.
    pub stored_in_classes: [u64; CODECS.len()],
    pub compress_time: [Duration; CODECS.len()],
    /// Time decoding the compressed pages back (pages stored whole not
    /// counted), and how many were decoded.
    pub decode_time: [Duration; CODECS.len()],
    pub decoded: [u64; CODECS.len()],
}

/// The step between size classes.
pub const CLASS: usize = vramblk_compress::CLASS_STEP;

/// The slot a compressed page of `len` bytes takes.
pub fn class_of(len: usize) -> usize {
    vramblk_compress::class_of(len).map_or(PAGE, |c| c.bytes())
}

impl Measured {
    /// Logical bytes over stored bytes, same-filled pages costing nothing
    /// (zramctl's DATA / COMPR).
    pub fn ratio(&self, codec: usize) -> f64 {
        let stored = self.stored[codec].max(1);
        (self.pages * PAGE as u64) as f64 / stored as f64
    }

    /// The ratio with every page in its size class.
    pub fn class_ratio(&self, codec: usize) -> f64 {
        let stored = self.stored_in_classes[codec].max(1);
        (self.pages * PAGE as u64) as f64 / stored as f64
    }

    /// Microseconds to decode one page, over the pages decoded.
    pub fn decode_us(&self, codec: usize) -> f64 {
        if self.decoded[codec] == 0 {
            return 0.0;
        }
        self.decode_time[codec].as_secs_f64() * 1e6 / self.decoded[codec] as f64
    }

    /// Compression speed over the pages it compressed, MB/s.
    pub fn speed_mb_s(&self, codec: usize) -> f64 {
        let bytes = (self.pages - self.same) * PAGE as u64;
        let s = self.compress_time[codec].as_secs_f64();
        if s == 0.0 {
            0.0
        } else {
            bytes as f64 / s / 1e6
        }
    }

    pub fn add(&mut self, o: &Measured) {
        self.pages += o.pages;
        self.same += o.same;
        self.zero += o.zero;
        for i in 0..CODECS.len() {
            self.stored[i] += o.stored[i];
            self.stored_in_classes[i] += o.stored_in_classes[i];
            self.compress_time[i] += o.compress_time[i];
            self.decode_time[i] += o.decode_time[i];
            self.decoded[i] += o.decoded[i];
        }
    }
}

/// The word a same-filled page repeats, if it is one.
pub fn same_filled(page: &[u8]) -> Option<u64> {
    vramblk_compress::same_filled(page.try_into().ok()?)
}

/// Measures `data`, a whole number of pages.
pub fn measure(data: &[u8]) -> Result<Measured> {
    if !data.len().is_multiple_of(PAGE) {
        bail!("{} bytes are not whole pages", data.len());
    }
    let mut m = Measured::default();
    let mut zstd: Vec<zstd::bulk::Compressor> = CODECS
        .iter()
        .filter_map(|c| match c {
            Codec::Zstd(l) => Some(zstd::bulk::Compressor::new(*l)),
            Codec::Lz4 | Codec::Vramblk => None,
        })
        .collect::<std::io::Result<_>>()
        .context("creating a zstd compressor")?;
    let mut unzstd = zstd::bulk::Decompressor::new().context("creating a zstd decompressor")?;
    let mut out = vec![0u8; 2 * PAGE];
    for page in data.chunks_exact(PAGE) {
        m.pages += 1;
        if let Some(word) = same_filled(page) {
            m.same += 1;
            m.zero += u64::from(word == 0);
            continue;
        }
        for (i, codec) in CODECS.iter().enumerate() {
            let started = Instant::now();
            let (len, back) = match codec {
                Codec::Lz4 => {
                    let len =
                        lz4_flex::block::compress_into(page, &mut out).context("lz4 compress")?;
                    m.compress_time[i] += started.elapsed();
                    let decoding = Instant::now();
                    let back = lz4_flex::block::decompress(&out[..len], PAGE).context("lz4")?;
                    m.decode_time[i] += decoding.elapsed();
                    m.decoded[i] += 1;
                    (len, back)
                }
                Codec::Vramblk => {
                    let page: &[u8; PAGE] = page.try_into().context("a page")?;
                    let len = vramblk_compress::lz::compress(page, &mut out);
                    m.compress_time[i] += started.elapsed();
                    let mut back = [0u8; PAGE];
                    match len {
                        Some(len) => {
                            let decoding = Instant::now();
                            vramblk_compress::lz::decompress(&out[..len], &mut back)
                                .context("vramblk's page codec")?;
                            m.decode_time[i] += decoding.elapsed();
                            m.decoded[i] += 1;
                            (len, back.to_vec())
                        }
                        // Too large for a slot: stored whole.
                        None => (PAGE, page.to_vec()),
                    }
                }
                Codec::Zstd(_) => {
                    let z = &mut zstd[i - 1];
                    let len = z
                        .compress_to_buffer(page, &mut out[..])
                        .context("zstd compress")?;
                    m.compress_time[i] += started.elapsed();
                    let decoding = Instant::now();
                    let back = unzstd.decompress(&out[..len], PAGE).context("zstd")?;
                    m.decode_time[i] += decoding.elapsed();
                    m.decoded[i] += 1;
                    (len, back)
                }
            };
            if back != page {
                bail!("{} did not give a page back as it was", codec.name());
            }
            m.stored[i] += len.min(PAGE) as u64;
            m.stored_in_classes[i] += class_of(len) as u64;
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_filled_pages_are_found_by_their_words() {
        assert_eq!(same_filled(&[0u8; PAGE]), Some(0));
        let mut p = [0xABu8; PAGE];
        assert_eq!(same_filled(&p), Some(0xABABABABABABABAB));
        p[4095] = 0;
        assert_eq!(same_filled(&p), None);
        // Repeating a word, not a byte.
        let word: Vec<u8> = (0..PAGE).map(|i| (i % 8) as u8).collect();
        assert!(same_filled(&word).is_some());
    }

    #[test]
    fn pages_take_whole_classes_and_big_ones_a_page() {
        assert_eq!(class_of(1), CLASS);
        assert_eq!(class_of(512), 512);
        assert_eq!(class_of(513), 512 + CLASS);
        assert_eq!(class_of(PAGE - CLASS), PAGE - CLASS);
        assert_eq!(
            class_of(PAGE - CLASS + 1),
            PAGE,
            "the last class would save nothing"
        );
        assert_eq!(class_of(5000), PAGE);
    }

    #[test]
    fn zeros_cost_nothing_text_shrinks_and_random_does_not() {
        let mut data = vec![0u8; PAGE];
        let text = b"the quick brown fox jumps over the lazy dog; ".repeat(PAGE / 45 + 1);
        data.extend_from_slice(&text[..PAGE]);
        let mut x = 0x9E3779B97F4A7C15u64;
        data.extend((0..PAGE).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        }));
        let m = measure(&data).unwrap();
        assert_eq!((m.pages, m.same, m.zero), (3, 1, 1));
        for i in 0..CODECS.len() {
            // The text page shrinks a lot; the random one is stored whole.
            assert!(
                m.stored[i] > PAGE as u64 && m.stored[i] < PAGE as u64 + 400,
                "{m:?}"
            );
            assert!(m.ratio(i) > 2.5 && m.ratio(i) < 3.0, "{}", m.ratio(i));
            // In classes the text page takes one slot of a few hundred bytes.
            let text_slot = m.stored_in_classes[i] - PAGE as u64;
            assert!(text_slot > 0 && text_slot < 512, "{m:?}");
            assert_eq!(text_slot % CLASS as u64, 0, "{m:?}");
        }
        assert!(measure(&data[..100]).is_err());
    }
}
