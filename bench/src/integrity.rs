//! The per-page checksums on the GPU: what the kernel stores equals the
//! CPU reference, and a bit flipped in VRAM fails the read of that page
//! alone, through the copy kernel and through the copy engines alike.

use crate::load::{slice, SynthQueue};
use vramblk_cuda_store::{page_sum, CudaStore, EXTENT, PAGE};
use vramblk_store::{Completion, Op, Request, Store};

/// Pages per round: enough for the copy kernel in auto mode (4 or more).
const PAGES: usize = 8;

/// Runs one round of `ops` (one page each, tag i at `first + i` pages) on
/// queue 0 and returns each tag's result.
fn round(sq: &mut SynthQueue, ops: &[(Op, u64)]) -> Vec<i32> {
    for (tag, &(op, offset)) in ops.iter().enumerate() {
        let buf = sq.bufs.slot(tag).expect("a buffer");
        sq.engine.enqueue(Request {
            tag: tag as u16,
            op,
            offset,
            len: PAGE as u32,
            buf,
        });
    }
    let mut results = vec![i32::MIN; ops.len()];
    sq.finish(|c: Completion| {
        if let Some(r) = results.get_mut(c.tag as usize) {
            *r = c.result;
        }
    });
    results
}

fn fill(sq: &SynthQueue, tag: usize, seed: u64) -> Vec<u8> {
    let b = &mut slice(sq.bufs.slot(tag).expect("a buffer"))[..PAGE as usize];
    let mut x = seed | 1;
    for v in b.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *v = x as u8;
    }
    b.to_vec()
}

/// `store` must have integrity on. `mode` names the store in the results.
pub fn checks(store: &CudaStore, mode: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    if !store.integrity() {
        out.push((format!("{mode}: integrity is on"), false));
        return out;
    }
    let mut sq = SynthQueue::open(store, 0, PAGES);
    // Pages in the last extent, discarded first so the first write below
    // maps it a fresh slot (the data checks wrote all over the store).
    let base = (store.size() - EXTENT) & !(PAGE - 1);
    let at = |i: usize| base + i as u64 * PAGE;
    let discard = |sq: &mut SynthQueue| {
        let buf = sq.bufs.slot(0).expect("a buffer");
        sq.engine.enqueue(Request {
            tag: 0,
            op: Op::Discard,
            offset: base,
            len: EXTENT as u32,
            buf,
        });
        let mut result = i32::MIN;
        sq.finish(|c| result = c.result);
        result == EXTENT as i32
    };
    let fresh_extent = discard(&mut sq);

    // Written as one round (the copy kernel), then page by page (the copy
    // engines, checksums by a launch after the copies).
    let mut data: Vec<Vec<u8>> = (0..PAGES).map(|i| fill(&sq, i, 0x51 + i as u64)).collect();
    let batch: Vec<(Op, u64)> = (0..PAGES).map(|i| (Op::Write, at(i))).collect();
    let wrote = round(&mut sq, &batch).iter().all(|&r| r == PAGE as i32);
    let mut single_ok = true;
    for (i, page) in data.iter_mut().enumerate().take(PAGES / 2) {
        *page = fill(&sq, 0, 0x77 + i as u64);
        single_ok &= round(&mut sq, &[(Op::Write, at(i))])[0] == PAGE as i32;
    }
    let sums_match = (0..PAGES)
        .all(|i| matches!(store.stored_checksum(at(i)), Ok(Some(s)) if s == page_sum(&data[i])));
    out.push((
        format!("{mode}: the checksum stored for each of {PAGES} pages, written as one round (auto: by the copy kernel on the GPU) and then one by one (the copy engines, summed on the CPU), equals the byte-by-byte CRC32C reference"),
        wrote && single_ok && sums_match,
    ));

    // A bit flipped in page 3's data in VRAM.
    let before = store.integrity_errors();
    let flipped = matches!(store.flip_bit(at(3) + 1000), Ok(true));
    let reads: Vec<(Op, u64)> = (0..PAGES).map(|i| (Op::Read, at(i))).collect();
    for i in 0..PAGES {
        slice(sq.bufs.slot(i).expect("a buffer"))[..PAGE as usize].fill(0xA5);
    }
    let results = round(&mut sq, &reads);
    let neighbours_fine = (0..PAGES).filter(|&i| i != 3).all(|i| {
        results[i] == PAGE as i32
            && slice(sq.bufs.slot(i).expect("a buffer"))[..PAGE as usize] == data[i][..]
    });
    let kernel_eio = results[3] == -libc::EIO;
    let single_eio = round(&mut sq, &[(Op::Read, at(3))])[0] == -libc::EIO;
    let counted = store.integrity_errors() == before + 2;
    out.push((
        format!("{mode}: a bit flipped in one page's VRAM: its read fails with EIO (in a kernel round: {kernel_eio}, alone on the copy engines: {single_eio}), the {} pages beside it read back intact: {neighbours_fine}, the count rose by 2: {counted}", PAGES - 1),
        flipped && kernel_eio && single_eio && neighbours_fine && counted,
    ));

    // A rewrite gives the page a true checksum again.
    data[3] = fill(&sq, 0, 0x99);
    let rewrote = round(&mut sq, &[(Op::Write, at(3))])[0] == PAGE as i32;
    let reread = round(&mut sq, &[(Op::Read, at(3))])[0] == PAGE as i32
        && slice(sq.bufs.slot(0).expect("a buffer"))[..PAGE as usize] == data[3][..];
    out.push((
        format!("{mode}: rewriting the page clears it: the read succeeds with the new data"),
        rewrote && reread,
    ));

    // Zeroed pages (write-zeroes) and never-written pages of a mapped
    // extent read as zeros without an error.
    let zeroed = round(&mut sq, &[(Op::WriteZeroes, at(5))])[0] == PAGE as i32;
    let fresh = base + 100 * PAGE;
    for i in 0..2 {
        slice(sq.bufs.slot(i).expect("a buffer"))[..PAGE as usize].fill(0xA5);
    }
    let r = round(&mut sq, &[(Op::Read, at(5)), (Op::Read, fresh)]);
    let zeros = (0..2).all(|i| {
        r[i] == PAGE as i32
            && slice(sq.bufs.slot(i).expect("a buffer"))[..PAGE as usize]
                .iter()
                .all(|&b| b == 0)
    });
    out.push((
        format!("{mode}: a zeroed page and a never-written page of a written extent read as zeros without an error"),
        fresh_extent && zeroed && zeros,
    ));

    // Discarded, then a fresh slot for the extent: the pages written
    // before read as zeros, so their checksums went with the data.
    let discarded = discard(&mut sq);
    fill(&sq, 0, 0x3);
    let remapped = round(&mut sq, &[(Op::Write, at(0))])[0] == PAGE as i32;
    slice(sq.bufs.slot(1).expect("a buffer"))[..PAGE as usize].fill(0xA5);
    let r = round(&mut sq, &[(Op::Write, at(0)), (Op::Read, at(1))]);
    let clean = r[1] == PAGE as i32
        && slice(sq.bufs.slot(1).expect("a buffer"))[..PAGE as usize]
            .iter()
            .all(|&b| b == 0);
    out.push((
        format!("{mode}: after the extent was discarded and written again, a page written before the discard reads as zeros without an error"),
        discarded && remapped && r[0] == PAGE as i32 && clean,
    ));
    out
}
