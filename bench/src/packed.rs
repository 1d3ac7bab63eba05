//! Compressed devices (issue 18): engine-bench's checks of the cuda store
//! with `Compress::Lz` and `Compress::Same`, through the same queue engine
//! a server runs: every byte against a host shadow with pages of every
//! kind, what the pages cost in VRAM, a second server importing the VRAM
//! (the page map read back), and give-back moving pool extents.
//! `--checks-only` runs them on the stand-in libcuda too (not GPU
//! evidence there).

use crate::load::{
    fill_content, policy_shape_row, set_write_content, shadow_check_of, slice, Content, Pattern,
    Rng, Shape, SynthQueue,
};
use crate::table::Row;
use std::os::fd::AsFd;
use vramblk_alloc_count::{counted, Armed};
use vramblk_cuda_store::pinned_tables_made;
use vramblk_cuda_store::{Compress, CudaStore, CudaStoreOptions, BACKOFF_STEP, EXTENT};
use vramblk_store::BufferRegion;
use vramblk_store::{Completion, Op, Request, Store};
use vramblk_ublk_target::engine::QueueEngine;
use vramblk_ublk_target::poll_policy::PollPolicy;

const MIB: u64 = 1 << 20;

/// Every check, each on its own store.
pub fn checks(gpu: u32) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for (mode, integrity) in [(Compress::Lz, true), (Compress::Same, false)] {
        let name = format!(
            "compress {mode:?}: random mixed ops (4 KiB - 512 KiB, write/read/write-zeroes/flush) \
             of zero, same-filled, compressible and random pages, 4 queues at once, integrity \
             {}, every byte against a host shadow",
            if integrity { "on" } else { "off" }
        );
        out.push(match create(gpu, 256 * MIB, mode, integrity) {
            Ok(store) => (name, shadow_on_queues(&store)),
            Err(e) => (format!("{name} (store: {e})"), false),
        });
    }
    out.push(lone_pages_check(gpu));
    out.push(no_allocation_check(gpu, Compress::Lz));
    out.push(no_allocation_check(gpu, Compress::Off));
    out.push(same_pages_raced_check(gpu));
    out.push(usage_check(gpu));
    out.push(import_check(gpu));
    out.push(give_back_check(gpu));
    out.push(compaction_check(gpu));
    out
}

fn create(gpu: u32, size: u64, mode: Compress, integrity: bool) -> Result<CudaStore, String> {
    CudaStore::create(&CudaStoreOptions {
        integrity: Some(integrity),
        compress: mode,
        ..CudaStoreOptions::new(size, gpu)
    })
    .map_err(|e| e.to_string())
}

fn shadow_on_queues(store: &CudaStore) -> bool {
    let queues = 4u16;
    let part = (store.size() / u64::from(queues)).min(64 * MIB) & !4095;
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..queues)
            .map(|q| {
                s.spawn(move || {
                    let lo = u64::from(q) * part;
                    shadow_check_of(store, q, lo, part, 0x51A + u64::from(q), Content::Mixed)
                })
            })
            .collect();
        hs.into_iter().all(|h| h.join().unwrap_or(false))
    })
}

/// Runs `op` over `data.len()` bytes from `offset` in 512 KiB requests on
/// queue 0 (writes from `data`, reads into it); false when one failed.
pub(crate) fn transfer(store: &CudaStore, op: Op, offset: u64, data: &mut [u8]) -> bool {
    transfer_on(store, 0, op, offset, data)
}

/// As [`transfer`], on queue `qid`.
fn transfer_on(store: &CudaStore, qid: u16, op: Op, offset: u64, data: &mut [u8]) -> bool {
    let chunk = 512 << 10;
    let depth = 8;
    let mut sq = SynthQueue::open(store, qid, depth);
    let mut ok = true;
    for (n, part) in data.chunks_mut(chunk * depth).enumerate() {
        for (tag, piece) in part.chunks_mut(chunk).enumerate() {
            let buf = sq.bufs.slot(tag).expect("a tag's buffer");
            if op == Op::Write {
                slice(buf)[..piece.len()].copy_from_slice(piece);
            }
            sq.engine.enqueue(Request {
                tag: tag as u16,
                op,
                offset: offset + ((n * depth + tag) * chunk) as u64,
                len: piece.len() as u32,
                buf,
            });
        }
        let mut got: Vec<Completion> = Vec::new();
        sq.finish(|c| got.push(c));
        for c in got {
            ok &= c.result >= 0;
            if op == Op::Read {
                let tag = c.tag as usize;
                let end = ((tag + 1) * chunk).min(part.len());
                let piece = &mut part[tag * chunk..end];
                let len = piece.len();
                piece.copy_from_slice(&slice(sq.bufs.slot(tag).expect("buffer"))[..len]);
            }
        }
    }
    ok
}

/// Rounds of one request of one or two pages (the CPU's path, both ways;
/// their blocks and entries go by the copy engine) beside larger ones (the
/// kernels'), against a shadow; then a server importing the VRAM finds
/// every page there (the host's copy of the map is not what it reads).
fn lone_pages_check(gpu: u32) -> (String, bool) {
    let name = "compress Lz: 3000 lone requests of 1-2 pages (compressed and decoded on the CPU) \
                between rounds of 32 pages (on the GPU), every page of every kind against a \
                host shadow, each page read back both ways; a server importing the VRAM then \
                reads every page as written";
    let store = match create(gpu, 64 * MIB, Compress::Lz, true) {
        Ok(s) => s,
        Err(e) => return (format!("{name} (store: {e})"), false),
    };
    let pages = 2048u64;
    let mut shadow = vec![0u8; (pages * 4096) as usize];
    let mut rng = Rng(0x10E);
    let mut ok = true;
    let mut sq = SynthQueue::open(&store, 0, 1);
    let buf = sq.bufs.slot(0).expect("a buffer");
    for i in 0..3000u64 {
        let n = if i % 50 == 49 { 32 } else { 1 + rng.below(2) };
        let at = rng.below(pages - n);
        let range = (at * 4096) as usize..((at + n) * 4096) as usize;
        let op = if rng.below(2) == 0 {
            Op::Write
        } else {
            Op::Read
        };
        if op == Op::Write {
            fill_content(&mut slice(buf)[..range.len()], Content::Mixed, &mut rng);
            shadow[range.clone()].copy_from_slice(&slice(buf)[..range.len()]);
        } else {
            slice(buf)[..range.len()].fill(0xA5);
        }
        sq.engine.enqueue(Request {
            tag: 0,
            op,
            offset: at * 4096,
            len: range.len() as u32,
            buf,
        });
        let mut got: Vec<Completion> = Vec::new();
        sq.finish(|c| got.push(c));
        let answered = got.iter().all(|c| c.result == range.len() as i32);
        let same = op == Op::Write || slice(buf)[..range.len()] == shadow[range.clone()];
        if !(answered && same) && ok {
            println!("  request {i}: {op:?} of {n} page(s) at page {at}: answered {answered}, data right {same}");
        }
        ok &= answered && same;
    }
    drop(sq);
    let Some(second) = handed_over(store, gpu) else {
        return (format!("{name} (the hand-over failed)"), false);
    };
    let mut back = vec![0u8; shadow.len()];
    let read = transfer(&second, Op::Read, 0, &mut back);
    let wrong = back
        .chunks(4096)
        .zip(shadow.chunks(4096))
        .filter(|(b, s)| b != s)
        .count();
    if !read || wrong > 0 {
        println!("  after the hand-over: read {read}, {wrong} of {pages} pages wrong");
    }
    (name.into(), ok && read && wrong == 0)
}

/// Two queues, each 96 deep, serve every kind of request a server sees
/// (writes and reads of 1 to 128 pages, batches of up to 96 of them, more
/// than a queue has rounds for; write-zeroes; discards up to 32 MiB;
/// flushes; lone pages for the CPU's path; both queues writing the same
/// pages, so requests wait for each other): once a queue is open, its
/// submit and poll allocate nothing, neither heap nor pinned tables. Then
/// every private page reads back as the shadow says. For a compressed
/// queue (`mode` on) and a plain one (`Compress::Off`, whose discard
/// unmaps the whole extents it covers and leaves the rest as it was).
fn no_allocation_check(gpu: u32, mode: Compress) -> (String, bool) {
    let name = format!(
        "compress {mode:?}: once open, a {} queue's submit and poll allocate nothing (heap or \
         pinned) under batches of 1-96 requests of every op and size (more rounds than a \
         queue has, discards up to 32 MiB, lone pages, two queues racing on shared pages), \
         every private page right after",
        if mode.is_on() { "compressed" } else { "plain" }
    );
    let store = match create(gpu, 256 * MIB, mode, true) {
        Ok(s) => s,
        Err(e) => return (format!("{name} (store: {e})"), false),
    };
    let depth = 96;
    let shared = 64u64;
    let part = 96 * MIB;
    // Counted from when both queues are open (the counts are the
    // process's; only the queues' submit and poll add to the heap's).
    let open = std::sync::Barrier::new(3);
    let run = |q: u16| -> Result<(), String> {
        let bufs = BufferRegion::new(depth, 512 << 10).map_err(|e| e.to_string());
        let queue = bufs
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|b| store.open_queue(q, b).map_err(|e| e.to_string()));
        open.wait();
        let (bufs, queue) = (bufs?, queue?);
        let mut engine = QueueEngine::new(Armed(queue), store.size(), depth);
        let lo = shared * 4096 + u64::from(q) * part;
        let pages = part / 4096;
        let mut shadow = vec![0u8; part as usize];
        let mut rng = Rng(0xA110C + u64::from(q));
        let mut failed = 0u64;
        for round in 0..400u64 {
            let n = match round % 4 {
                0 => depth,
                1 => 1,
                _ => 1 + rng.below(depth as u64) as usize,
            };
            let mut reads: Vec<(u16, usize, usize)> = Vec::new();
            let mut taken: Vec<(u64, u64)> = Vec::new();
            for tag in 0..n {
                let buf = bufs.slot(tag).ok_or("a tag's buffer")?;
                let op = match (round % 4, rng.below(20)) {
                    (0, _) => Op::Read,
                    (_, 0..=8) => Op::Write,
                    (_, 9..=15) => Op::Read,
                    (_, 16) => Op::WriteZeroes,
                    (_, 17) => Op::Discard,
                    (_, 18) => Op::Write,
                    _ => Op::Flush,
                };
                if op == Op::Write && tag % 7 == 3 {
                    // A page both queues write: it waits while the other's
                    // write of it is on its way.
                    let at = rng.below(shared);
                    fill_content(&mut slice(buf)[..4096], Content::Mixed, &mut rng);
                    engine.enqueue(Request {
                        tag: tag as u16,
                        op,
                        offset: at * 4096,
                        len: 4096,
                        buf,
                    });
                    continue;
                }
                let size = match op {
                    Op::Discard => (1 + rng.below(8192)) * 4096,
                    _ if round % 4 == 1 => (1 + rng.below(2)) * 4096,
                    _ => (1 + rng.below(128)) * 4096,
                };
                let size = size.min(part / 2);
                let off = rng.below(pages - size / 4096) * 4096;
                if taken.iter().any(|&(a, b)| off + size > a && off < b) {
                    continue;
                }
                taken.push((off, off + size));
                let range = off as usize..(off + size) as usize;
                match op {
                    Op::Write => {
                        let b = &mut slice(buf)[..size as usize];
                        fill_content(b, Content::Mixed, &mut rng);
                        shadow[range].copy_from_slice(b);
                    }
                    Op::Read => reads.push((tag as u16, range.start, range.len())),
                    Op::WriteZeroes => shadow[range].fill(0),
                    Op::Discard if mode.is_on() => shadow[range].fill(0),
                    Op::Discard => {
                        // The whole extents it covers are unmapped (read
                        // as zeros); the rest keeps its data.
                        let x = EXTENT;
                        let first = (lo + off).div_ceil(x) * x;
                        let end = (lo + off + size) / x * x;
                        if end > first {
                            shadow[(first - lo) as usize..(end - lo) as usize].fill(0);
                        }
                    }
                    _ => {}
                }
                let (offset, len) = if op == Op::Flush {
                    (0, 0)
                } else {
                    (lo + off, size as u32)
                };
                engine.enqueue(Request {
                    tag: tag as u16,
                    op,
                    offset,
                    len,
                    buf,
                });
            }
            let mut results: Vec<Completion> = Vec::new();
            while engine.has_work() {
                engine.pump(|c| results.push(c));
            }
            failed += results.iter().filter(|c| c.result < 0).count() as u64;
            for (tag, at, len) in reads {
                let buf = bufs.slot(tag.into()).ok_or("a tag's buffer")?;
                if slice(buf)[..len] != shadow[at..at + len] {
                    return Err(format!(
                        "queue {q} round {round}: a read of {len} B at {at} differs"
                    ));
                }
            }
        }
        if failed > 0 {
            return Err(format!("queue {q}: {failed} request(s) failed"));
        }
        Ok(())
    };
    let (results, heap, pinned) = std::thread::scope(|s| {
        let run = &run;
        let hs: Vec<_> = (0..2u16).map(|q| s.spawn(move || run(q))).collect();
        open.wait();
        let (heap, tables) = (counted(), pinned_tables_made());
        let results: Vec<Result<(), String>> = hs
            .into_iter()
            .map(|h| h.join().unwrap_or(Err("the queue thread panicked".into())))
            .collect();
        (results, counted() - heap, pinned_tables_made() - tables)
    });
    println!("  {mode:?}: while serving: {heap} heap allocation(s), {pinned} pinned table(s) made");
    let mut ok = heap == 0 && pinned == 0;
    for r in results {
        if let Err(e) = r {
            println!("  {e}");
            ok = false;
        }
    }
    (name, ok)
}

/// A page that says who wrote it: its first word names the queue, round
/// and page, the rest repeats a pattern derived from it (so it
/// compresses, and any mix of two writes shows).
fn signed_page(page: &mut [u8], q: u64, round: u64, index: u64) {
    let head = q << 48 | round << 24 | index;
    for (i, w) in page.chunks_exact_mut(8).enumerate() {
        let v = if i == 0 { head } else { head ^ (i as u64 % 7) };
        w.copy_from_slice(&v.to_ne_bytes());
    }
}

/// Whether `page` is one [`signed_page`] wrote for page `index`.
fn signed_right(page: &[u8], index: u64) -> bool {
    let head = u64::from_ne_bytes(page[..8].try_into().unwrap_or_default());
    let mut want = vec![0u8; page.len()];
    signed_page(&mut want, head >> 48, head >> 24 & 0xff_ffff, index);
    head & 0xff_ffff == index && want == page
}

/// Four queues write the same 64 pages over and over at once (what the
/// block layer allows, each page then holding one of the writes): every
/// page reads back as one whole write, never a mix or another page's
/// block, and a second store importing the VRAM finds a page map naming
/// each slot once.
fn same_pages_raced_check(gpu: u32) -> (String, bool) {
    let name = "compress Lz: 4 queues writing the same 64 pages at once for 200 rounds \
                (1-16 pages a request): every page reads back as one whole write, and \
                a second store importing the VRAM accepts its page map and reads the same";
    let store = match create(gpu, 64 * MIB, Compress::Lz, true) {
        Ok(s) => s,
        Err(e) => return (format!("{name} (store: {e})"), false),
    };
    let pages = 64u64;
    let errors = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for q in 0..4u64 {
            let (store, errors) = (&store, &errors);
            s.spawn(move || {
                let mut sq = SynthQueue::open(store, q as u16, 4);
                let mut rng = Rng(0x5A3E + q);
                for round in 0..200u64 {
                    for tag in 0..4usize {
                        let n = 1 + rng.below(16);
                        let at = rng.below(pages - n + 1);
                        let buf = sq.bufs.slot(tag).expect("a buffer");
                        for k in 0..n {
                            let b = &mut slice(buf)[(k * 4096) as usize..((k + 1) * 4096) as usize];
                            signed_page(b, q, round, at + k);
                        }
                        sq.engine.enqueue(Request {
                            tag: tag as u16,
                            op: Op::Write,
                            offset: at * 4096,
                            len: (n * 4096) as u32,
                            buf,
                        });
                    }
                    sq.finish(|c| {
                        if c.result < 0 {
                            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    });
                }
            });
        }
    });
    let all_signed = |st: &CudaStore| {
        let mut back = vec![0u8; (pages * 4096) as usize];
        transfer(st, Op::Read, 0, &mut back)
            && back
                .chunks(4096)
                .enumerate()
                .all(|(i, p)| signed_right(p, i as u64))
    };
    let read = all_signed(&store);
    let imported = handed_over(store, gpu);
    let reread = imported.as_ref().is_some_and(all_signed);
    let failed = errors.load(std::sync::atomic::Ordering::Relaxed);
    let ok = failed == 0 && read && reread;
    if !ok {
        println!(
            "  {failed} writes failed; pages whole {read}; imported {}, pages whole there {reread}",
            imported.is_some()
        );
    }
    (name.into(), ok)
}

/// Pages of each kind in turn: 64 zero, 64 same-filled, 64 compressible,
/// 64 random.
fn kinds_in_order() -> Vec<u8> {
    let mut data = vec![0u8; 256 * 4096];
    let mut rng = Rng(0xABCD_EF01);
    for (i, page) in data.chunks_mut(4096).enumerate() {
        let word = rng.next().to_ne_bytes();
        match i / 64 {
            0 => {}
            1 => page
                .iter_mut()
                .enumerate()
                .for_each(|(j, x)| *x = word[j % 8]),
            2 => {
                let text = format!("page {i} of a shell's heap: PATH=/usr/bin HOME=/root ");
                for (j, x) in page.iter_mut().enumerate() {
                    *x = text.as_bytes()[j % text.len()];
                }
            }
            _ => page.iter_mut().for_each(|x| *x = rng.next() as u8),
        }
    }
    data
}

/// A second `lz` store (integrity on) importing `store`'s VRAM, as a
/// recovering server does, once `store` is gone; None when the export or
/// the import failed.
fn handed_over(store: CudaStore, gpu: u32) -> Option<CudaStore> {
    store.set_erase_on_drop(false);
    let imported = store.exported_chunks().ok().and_then(|chunks| {
        let borrowed: Vec<_> = chunks.iter().map(|(l, fd)| (*l, fd.as_fd())).collect();
        let opts = CudaStoreOptions {
            integrity: Some(true),
            compress: Compress::Lz,
            ..CudaStoreOptions::new(store.size(), gpu)
        };
        CudaStore::import(&opts, &borrowed).ok()
    });
    drop(store);
    imported
}

/// Data VRAM (less the maps) a store holds now.
fn data_vram(store: &CudaStore) -> u64 {
    store.used_bytes() - store.reserved_bytes()
}

/// What each kind of page costs, and that rewriting pages frees theirs.
fn usage_check(gpu: u32) -> (String, bool) {
    let name = "compress Lz: 64 zero + 64 same-filled pages take no VRAM, 64 compressible pages \
                one pool extent of their class, 64 random ones one raw extent; zeroing them all \
                gives those extents back";
    let store = match create(gpu, 256 * MIB, Compress::Lz, true) {
        Ok(s) => s,
        Err(e) => return (format!("{name} (store: {e})"), false),
    };
    let mut data = kinds_in_order();
    let wrote = transfer(&store, Op::Write, 8 * MIB, &mut data);
    let u = store.packed_usage().unwrap_or_default();
    let held = data_vram(&store);
    let mut back = vec![0xA5u8; data.len()];
    let read = transfer(&store, Op::Read, 8 * MIB, &mut back);
    let mut zeros = vec![0u8; data.len()];
    let zeroed = transfer(&store, Op::Write, 8 * MIB, &mut zeros);
    let after = store.packed_usage().unwrap_or_default();
    let ok = wrote
        && read
        && zeroed
        && back == data
        && (u.same_pages, u.compressed_pages, u.raw_pages) == (128, 64, 64)
        && u.compressed_bytes < 64 * 4096 / 4
        && held == 2 * EXTENT
        && (after.same_pages, after.compressed_pages, after.raw_pages) == (256, 0, 0)
        && data_vram(&store) == 0;
    if !ok {
        println!(
            "  wrote {wrote} read {read} same {} zeroed {zeroed}; usage {u:?} with {} KiB of data \
             VRAM; after zeroing {after:?} with {} KiB",
            back == data,
            held >> 10,
            data_vram(&store) >> 10
        );
    }
    (name.into(), ok)
}

/// A second store imports the first one's VRAM (as a recovering server
/// does) and reads every page back.
fn import_check(gpu: u32) -> (String, bool) {
    let name = "compress Lz: a server importing the VRAM reads the page map back, rebuilds the \
                pool and reads every page as written; its new writes take free slots only";
    let size = 256 * MIB;
    let first = match create(gpu, size, Compress::Lz, true) {
        Ok(s) => s,
        Err(e) => return (format!("{name} (store: {e})"), false),
    };
    let mut data = vec![0u8; 32 * MIB as usize];
    fill_content(&mut data, Content::Mixed, &mut Rng(0x1F0));
    let wrote = transfer(&first, Op::Write, 0, &mut data);
    let usage = first.packed_usage();
    first.set_erase_on_drop(false);
    let chunks = match first.exported_chunks() {
        Ok(c) => c,
        Err(e) => return (format!("{name} (export: {e})"), false),
    };
    let borrowed: Vec<_> = chunks.iter().map(|(l, fd)| (*l, fd.as_fd())).collect();
    let opts = CudaStoreOptions {
        integrity: Some(true),
        compress: Compress::Lz,
        ..CudaStoreOptions::new(size, gpu)
    };
    let second = match CudaStore::import(&opts, &borrowed) {
        Ok(s) => s,
        Err(e) => return (format!("{name} (import: {e})"), false),
    };
    drop(first);
    let mut back = vec![0u8; data.len()];
    let read = transfer(&second, Op::Read, 0, &mut back);
    // New pages after the old ones must not land on a slot a page holds.
    let mut more = vec![0u8; 8 * MIB as usize];
    fill_content(&mut more, Content::Mixed, &mut Rng(0x2F0));
    let wrote_more = transfer(&second, Op::Write, 64 * MIB, &mut more);
    let mut back_again = vec![0u8; data.len()];
    let reread = transfer(&second, Op::Read, 0, &mut back_again);
    let ok = wrote
        && read
        && wrote_more
        && reread
        && back == data
        && back_again == data
        && second.packed_usage().is_some()
        && usage.is_some()
        && usage.map(|u| u.data_bytes()) == Some(data.len() as u64);
    if !ok {
        println!(
            "  wrote {wrote} read {read} same {} more {wrote_more} reread {reread} same {}; \
             usage before {usage:?}",
            back == data,
            back_again == data
        );
    }
    (name.into(), ok)
}

/// Giving VRAM back moves the pool extents of the last chunks into free
/// slots of the first; every page still reads back.
fn give_back_check(gpu: u32) -> (String, bool) {
    let name = "compress Lz: give-back moves pool extents out of the chunks it frees while \
                the pages stay readable";
    let store = match create(gpu, 1 << 30, Compress::Lz, true) {
        Ok(s) => s,
        Err(e) => return (format!("{name} (store: {e})"), false),
    };
    // Fill enough pool extents to spill into the second chunk, then empty
    // the first ones, so live extents sit high and free slots low.
    let mut filler = vec![0u8; 600 * MIB as usize];
    fill_content(&mut filler, Content::Random, &mut Rng(0x3F0));
    let filled = transfer(&store, Op::Write, 0, &mut filler);
    let mut data = vec![0u8; 64 * MIB as usize];
    fill_content(&mut data, Content::Mixed, &mut Rng(0x4F0));
    let wrote = transfer(&store, Op::Write, 700 * MIB, &mut data);
    let mut zeros = vec![0u8; filler.len()];
    let emptied = transfer(&store, Op::Write, 0, &mut zeros);
    let before = store.held_bytes();
    let resized = store.give_back(0);
    let mut back = vec![0u8; data.len()];
    let read = transfer(&store, Op::Read, 700 * MIB, &mut back);
    let (after, moved) = match &resized {
        Ok(r) => (r.after, r.moved),
        Err(_) => (before, 0),
    };
    let ok = filled && wrote && emptied && read && back == data && after < before && moved > 0;
    if !ok {
        println!(
            "  filled {filled} wrote {wrote} emptied {emptied} read {read} same {}; held {} -> {} \
             MiB, {moved} moved ({:?})",
            back == data,
            before >> 20,
            after >> 20,
            resized.err().map(|e| e.to_string())
        );
    }
    (name.into(), ok)
}

/// Fills `b` (whole pages) with pages that shrink by varied amounts into
/// most classes: per page random bytes for 1-3.6 KiB then zeros, every
/// fourth page random throughout (kept raw).
pub(crate) fn fill_packable(b: &mut [u8], rng: &mut Rng) {
    for (i, page) in b.chunks_mut(4096).enumerate() {
        let head = if i % 4 == 3 {
            page.len()
        } else {
            (1024 + (i * 37 % 22) * 128).min(page.len())
        };
        for x in &mut page[..head] {
            *x = rng.next() as u8;
        }
        page[head..].fill(0);
    }
}

/// Discards the 64 KiB pieces of [lo, lo + len) that `gone(piece)` names
/// (pieces counted from `lo`), 16 at a time on queue `qid`; false when
/// one failed.
pub(crate) fn discard_pieces(
    store: &CudaStore,
    qid: u16,
    lo: u64,
    len: u64,
    gone: impl Fn(u64) -> bool,
) -> bool {
    const PIECE: u64 = 64 << 10;
    let depth = 16;
    let mut sq = SynthQueue::open(store, qid, depth);
    let mut pieces = (0..len / PIECE).filter(|&p| gone(p)).peekable();
    let mut ok = true;
    while pieces.peek().is_some() {
        for (tag, p) in pieces.by_ref().take(depth).enumerate() {
            sq.engine.enqueue(Request {
                tag: tag as u16,
                op: Op::Discard,
                offset: lo + p * PIECE,
                len: PIECE as u32,
                buf: sq.bufs.slot(tag).expect("a tag's buffer"),
            });
        }
        sq.finish(|c| ok &= c.result >= 0);
    }
    ok
}

/// Pages discarded all over a device leave every pool extent of their
/// class partly filled: a give-back packs the blocks tight first
/// (compact.rs) and frees what that empties, while one queue reads the
/// pages whose blocks it moves and another writes pages of its own.
fn compaction_check(gpu: u32) -> (String, bool) {
    let name = "compress Lz: a give-back packs the blocks that discards left in 3 of 4 pieces \
                all over 900 MiB into few pool extents and frees the chunk they emptied, while a \
                queue reads those pages (every byte as written) and another writes and reads its \
                own against a shadow; a server importing the VRAM afterwards reads the same";
    let size = 1 << 30;
    let store = match create(gpu, size, Compress::Lz, true) {
        Ok(s) => s,
        Err(e) => return (format!("{name} (store: {e})"), false),
    };
    let mut data = vec![0u8; 900 * MIB as usize];
    fill_packable(&mut data, &mut Rng(0x5F0));
    let wrote = transfer(&store, Op::Write, 0, &mut data);
    let gone = |piece: u64| !piece.is_multiple_of(4);
    let discarded = discard_pieces(&store, 0, 0, data.len() as u64, gone);
    for (p, piece) in data.chunks_mut(64 << 10).enumerate() {
        if gone(p as u64) {
            piece.fill(0);
        }
    }
    let vram_before = data_vram(&store);
    let done = std::sync::atomic::AtomicBool::new(false);
    let (resized, took, passes, read_ok, shadow_ok) = std::thread::scope(|s| {
        let store = &store;
        let (data, done) = (&data, &done);
        let reader = s.spawn(move || {
            let (mut passes, mut ok) = (0, true);
            let mut back = vec![0u8; data.len()];
            while passes == 0 || !done.load(std::sync::atomic::Ordering::Relaxed) {
                ok &= transfer_on(store, 1, Op::Read, 0, &mut back) && back == *data;
                passes += 1;
            }
            (passes, ok)
        });
        let writer =
            s.spawn(move || shadow_check_of(store, 2, 960 * MIB, 64 * MIB, 0x6F0, Content::Mixed));
        let clock = std::time::Instant::now();
        let resized = store.give_back(0);
        let took = clock.elapsed();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let (passes, read_ok) = reader.join().unwrap_or((0, false));
        (
            resized,
            took,
            passes,
            read_ok,
            writer.join().unwrap_or(false),
        )
    });
    let vram_after = data_vram(&store);
    let slot_bytes = store.packed_usage().unwrap_or_default().slot_bytes;
    let mut back = vec![0u8; data.len()];
    let read_after = transfer(&store, Op::Read, 0, &mut back) && back == data;
    // What a recovering server finds: the page map names the new slots.
    let imported = handed_over(store, gpu);
    let import_ok = imported.is_some_and(|second| {
        back.fill(0xA5);
        transfer(&second, Op::Read, 0, &mut back) && back == data
    });
    let (before, after, blocks) = match &resized {
        Ok(r) => (r.before, r.after, r.blocks_moved),
        Err(_) => (0, 0, 0),
    };
    // Packed tight, each class in use has at most one extent partly
    // filled: the blocks' slots plus one extent per class.
    let classes = vramblk_compress::CLASSES as u64 + 1;
    let ok = wrote
        && discarded
        && read_ok
        && shadow_ok
        && read_after
        && import_ok
        && blocks > 0
        && after <= BACKOFF_STEP
        && vram_after <= slot_bytes + classes * EXTENT
        && vram_after * 2 < vram_before;
    println!(
        "  compaction: {blocks} blocks moved; data VRAM {} -> {} MiB for {} MiB of slots; held {} \
         -> {} MiB; the give-back took {} ms, {passes} read passes meanwhile",
        vram_before >> 20,
        vram_after >> 20,
        slot_bytes >> 20,
        before >> 20,
        after >> 20,
        took.as_millis()
    );
    if !ok {
        println!(
            "  wrote {wrote} discarded {discarded}; during the give-back {passes} reads ok {read_ok}, \
             shadow {shadow_ok}; after it read {read_after}, imported {import_ok}; held {} -> {} \
             MiB, {blocks} blocks moved, data VRAM {} -> {} MiB for {} MiB of slots ({:?})",
            before >> 20,
            after >> 20,
            vram_before >> 20,
            vram_after >> 20,
            slot_bytes >> 20,
            resized.err().map(|e| e.to_string())
        );
    }
    (name.into(), ok)
}

/// The shapes timed with compression on beside off (issue 18's list).
const BENCH_SHAPES: &[Shape] = &[
    ("4 KiB randwrite", Pattern::RandWrite, 4096, 1, 1),
    ("4 KiB randread", Pattern::RandRead, 4096, 1, 1),
    ("4 KiB randwrite", Pattern::RandWrite, 4096, 1, 32),
    ("4 KiB randread", Pattern::RandRead, 4096, 1, 32),
    ("4 KiB randwrite", Pattern::RandWrite, 4096, 16, 128),
    ("4 KiB randread", Pattern::RandRead, 4096, 16, 128),
    ("512 KiB seq write", Pattern::SeqWrite, 512 << 10, 4, 32),
    ("512 KiB seq read", Pattern::SeqRead, 512 << 10, 4, 32),
];

/// Writes `content` (whole pages, used in turn) over the whole store.
fn fill_store(store: &CudaStore, content: &[u8]) -> bool {
    let step = 64 * MIB as usize;
    let mut block = vec![0u8; step];
    for (i, page) in block.chunks_mut(4096).enumerate() {
        let at = i % (content.len() / 4096) * 4096;
        page.copy_from_slice(&content[at..at + 4096]);
    }
    (0..store.size()).step_by(step).all(|off| {
        transfer(
            store,
            Op::Write,
            off,
            &mut block[..(store.size() - off).min(step as u64) as usize],
        )
    })
}

/// How the load threads of `--compress-bench` wait for their rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadPolicy {
    /// Polling without a nap (every other table's loop).
    Spin,
    /// The server's queue-loop policy (`--policy server`).
    Server,
}

impl LoadPolicy {
    fn poll(self) -> PollPolicy {
        match self {
            LoadPolicy::Spin => PollPolicy::SPIN_ONLY,
            LoadPolicy::Server => PollPolicy::SERVER,
        }
    }
}

/// `--compress-bench`: each shape on a store with compression off and one
/// with `lz`, both first filled with the same pages (the corpus's, then
/// random ones), the loads' buffers holding those pages too; a markdown
/// report.
pub fn bench(
    gpu: u32,
    corpus: &[u8],
    size: u64,
    secs: f64,
    policy: LoadPolicy,
) -> Result<String, String> {
    // The stage table below; a server never times its rounds.
    vramblk_cuda_store::stages::enable();
    let mut random = vec![0u8; 16 * MIB as usize];
    fill_content(&mut random, Content::Random, &mut Rng(0x5EED));
    let mut out = String::new();
    let mut usage = String::new();
    let mut rows: Vec<(String, Row, Row)> = Vec::new();
    for (what, pages) in [("corpus", corpus), ("random", random.as_slice())] {
        if pages.len() < 4096 {
            continue;
        }
        let mut by_mode = Vec::new();
        for mode in [Compress::Off, Compress::Lz] {
            // Checksums off in both: the loads' random requests of many
            // queues overlap, and a read beside a write of the same page
            // may see one's data with the other's checksum.
            let store = CudaStore::create(&CudaStoreOptions {
                compress: mode,
                integrity: Some(false),
                ..CudaStoreOptions::new(size, gpu)
            })
            .map_err(|e| e.to_string())?;
            if !fill_store(&store, pages) {
                return Err(format!(
                    "filling the {mode:?} store with {what} pages failed"
                ));
            }
            if let Some(u) = store.packed_usage() {
                usage += &format!(
                    "| {what} | {} MiB | {} MiB | {} MiB | {:.2}x | {} | {} | {} |\n",
                    u.data_bytes() >> 20,
                    u.compr_bytes() >> 20,
                    store.used_bytes() >> 20,
                    u.data_bytes() as f64 / store.used_bytes().max(1) as f64,
                    u.same_pages,
                    u.compressed_pages,
                    u.raw_pages
                );
            }
            set_write_content(Some(std::sync::Arc::new(pages.to_vec())));
            let label = format!("{mode:?}").to_lowercase();
            let r: Vec<Row> = BENCH_SHAPES
                .iter()
                .map(|&shape| policy_shape_row(&store, &label, shape, secs, policy.poll()))
                .collect();
            set_write_content(None);
            by_mode.push(r);
        }
        if let [off, lz] = &by_mode[..] {
            for (a, b) in off.iter().zip(lz) {
                rows.push((what.to_string(), a.clone(), b.clone()));
            }
        }
    }
    out += "| content | shape | queues x depth | off | lz | lz / off | p50 off / lz (us) | host CPU per I/O off / lz (us) | errors |\n";
    out += "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for (what, a, b) in &rows {
        let (x, y, unit) = if a.bs >= 128 << 10 {
            (a.gbps, b.gbps, "GB/s")
        } else {
            (a.iops / 1e3, b.iops / 1e3, "k IOPS")
        };
        out += &format!(
            "| {what} | {} | {} x {} | {x:.1} {unit} | {y:.1} {unit} | {:.2}x | {:.1} / {:.1} | {:.2} / {:.2} | {} |\n",
            a.name,
            a.queues,
            a.depth,
            y / x.max(1e-9),
            a.p50,
            b.p50,
            a.cpu_us_per_io,
            b.cpu_us_per_io,
            a.errors + b.errors
        );
    }
    out += "\nWhere the `lz` store's rounds spend their time (cuda-store's stages.rs; a round's last trip to the GPU is `gpu`; the lock waits are inside the others):\n\n";
    out += &crate::table::packed_stage_times(rows.iter().map(|(w, _, lz)| (w.as_str(), lz)));
    out += "\nWhat the filled `lz` store holds (DATA: pages written, whole; COMPR: their blocks; TOTAL: VRAM held for data and maps):\n\n| content | DATA | COMPR | TOTAL | DATA / TOTAL | same-filled | compressed | incompressible |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n";
    out += &usage;
    Ok(out)
}
