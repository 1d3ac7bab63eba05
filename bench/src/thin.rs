//! Giving VRAM back while the device stays up: data spread over every
//! chunk, most of it discarded, then `give_back` must move what is left
//! into the first chunks, free the rest (free VRAM rises by as much), keep
//! every byte, refuse new data beyond what it holds, take VRAM back, and
//! hand a later server exactly the chunks it holds; all while another
//! queue reads and writes against a shadow.

use crate::load::{free_vram, shadow_check, slice, SynthQueue};
use vramblk_cuda_store::{CudaStore, CudaStoreOptions, BACKOFF_STEP, EXTENT};
use vramblk_store::{Completion, Op, Request, Store};

const BLOCK: u64 = 64 << 10;

/// The byte every block of extent `e` is filled with.
fn pattern(e: u64) -> u8 {
    (e as u8).wrapping_mul(37) | 1
}

fn one(sq: &mut SynthQueue, op: Op, offset: u64, len: u64) -> i32 {
    sq.engine.enqueue(Request {
        tag: 0,
        op,
        offset,
        len: len as u32,
        buf: sq.bufs.slot(0).expect("a buffer"),
    });
    let mut result = 0;
    sq.finish(|c: Completion| result = c.result);
    result
}

fn write_extent_head(sq: &mut SynthQueue, e: u64) -> bool {
    slice(sq.bufs.slot(0).expect("a buffer"))[..BLOCK as usize].fill(pattern(e));
    one(sq, Op::Write, e * EXTENT, BLOCK) == BLOCK as i32
}

/// Whether extent `e`'s first block reads as `want`.
fn reads(sq: &mut SynthQueue, e: u64, want: u8) -> bool {
    slice(sq.bufs.slot(0).expect("a buffer"))[..BLOCK as usize].fill(0xA5);
    one(sq, Op::Read, e * EXTENT, BLOCK) == BLOCK as i32
        && slice(sq.bufs.slot(0).expect("a buffer"))[..BLOCK as usize]
            .iter()
            .all(|&b| b == want)
}

/// Queues `0..4` write interleaved 4 KiB blocks into the same fresh
/// extents at once (each first write of an extent races the others for
/// its mapping), then every block is read back.
fn shared_first_writes(store: &CudaStore) -> bool {
    let extents = 64u64;
    let queues = 4u64;
    let stamp = |q: u64, e: u64, k: u64| ((q * 131 + e * 7 + k) as u8) | 1;
    let wrote = std::thread::scope(|s| {
        let hs: Vec<_> = (0..queues)
            .map(|q| {
                s.spawn(move || {
                    let mut sq = SynthQueue::open(store, 10 + q as u16, 1);
                    let mut ok = true;
                    for e in 0..extents {
                        for k in 0..8 {
                            let off = e * EXTENT + (k * queues + q) * 4096;
                            slice(sq.bufs.slot(0).expect("a buffer"))[..4096].fill(stamp(q, e, k));
                            ok &= one(&mut sq, Op::Write, off, 4096) == 4096;
                        }
                    }
                    ok
                })
            })
            .collect();
        hs.into_iter().all(|h| h.join().unwrap_or(false))
    });
    let mut sq = SynthQueue::open(store, 20, 1);
    let mut same = true;
    for e in 0..extents {
        for k in 0..8 {
            for q in 0..queues {
                let off = e * EXTENT + (k * queues + q) * 4096;
                slice(sq.bufs.slot(0).expect("a buffer"))[..4096].fill(0xA5);
                same &= one(&mut sq, Op::Read, off, 4096) == 4096
                    && slice(sq.bufs.slot(0).expect("a buffer"))[..4096]
                        .iter()
                        .all(|&b| b == stamp(q, e, k));
            }
        }
    }
    wrote && same
}

pub fn give_back_checks(gpu: u32) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    match CudaStore::create(&CudaStoreOptions::new(256 << 20, gpu)) {
        Ok(s) => out.push((
            "4 queues writing into the same fresh extents at once: every block lands".into(),
            shared_first_writes(&s),
        )),
        Err(e) => out.push((format!("shared first writes: no store: {e}"), false)),
    }
    let size = 2u64 << 30;
    let store = match CudaStore::create(&CudaStoreOptions::new(size, gpu)) {
        Ok(s) => s,
        Err(e) => return vec![(format!("give-back: no 2 GiB store: {e}"), false)],
    };
    store.set_erase_on_drop(false);
    let extents = store.size() / EXTENT;
    let mut sq = SynthQueue::open(&store, 0, 1);

    // A fresh device holds all its VRAM and no data.
    let full = store.held_bytes();
    out.push((
        format!(
            "fresh 2 GiB device: holds {} MiB, {} MiB of it data (the map and the page checksums)",
            full >> 20,
            store.used_bytes() >> 20
        ),
        full == store.full_bytes()
            && store.used_bytes() == store.reserved_bytes()
            && store.reserved_bytes() == (1 + u64::from(store.integrity())) * EXTENT,
    ));

    // Data in every extent, then every extent but each 8th discarded (as
    // swap discards freed clusters): what is left sits in every chunk.
    let wrote = (0..extents).all(|e| write_extent_head(&mut sq, e));
    let mut discarded = true;
    for e in (0..extents).filter(|e| e % 8 != 0) {
        discarded &= one(&mut sq, Op::Discard, e * EXTENT, EXTENT) == EXTENT as i32;
    }
    let zeros = (0..extents)
        .filter(|e| e % 8 != 0)
        .all(|e| reads(&mut sq, e, 0));
    out.push((
        format!(
            "{extents} extents written, 7 of 8 discarded: discarded ones read as zeros, {} MiB holds data",
            store.used_bytes() >> 20
        ),
        wrote
            && discarded
            && zeros
            && store.used_bytes() == (extents / 8) * EXTENT + store.reserved_bytes(),
    ));

    // Give back to 0 while queue 1 reads and writes its own range against
    // a shadow (its extents may be moved under it).
    let free_before = free_vram(&store);
    let lo = (extents / 2) * EXTENT;
    let (resized, shadow_ok) = std::thread::scope(|s| {
        let busy = s.spawn(|| shadow_check(&store, 1, lo, 64 << 20, 0xC0FFEE));
        std::thread::sleep(std::time::Duration::from_millis(1));
        let r = store.give_back(0);
        (r, busy.join().unwrap_or(false))
    });
    let freed = free_vram(&store).saturating_sub(free_before);
    let (ok, text) = match resized {
        Ok(r) => (
            r.after < r.before
                && r.after == store.held_bytes()
                && r.after % BACKOFF_STEP == 0
                && r.moved > 0
                && freed + (64 << 20) >= r.before - r.after,
            format!(
                "held {} -> {} MiB, {} extents moved, free VRAM rose {} MiB",
                r.before >> 20,
                r.after >> 20,
                r.moved,
                freed >> 20
            ),
        ),
        Err(e) => (false, format!("failed: {e}")),
    };
    out.push((
        format!("give back the unused part while a queue runs random I/O on 64 MiB: {text}"),
        ok,
    ));
    out.push((
        "that queue's every read matched its shadow during the give-back".into(),
        shadow_ok,
    ));
    let kept = (0..extents)
        .filter(|e| e % 8 == 0 && !(lo..lo + (64 << 20)).contains(&(e * EXTENT)))
        .all(|e| reads(&mut sq, e, pattern(e)));
    out.push(("every kept extent reads back what was written".into(), kept));

    // New data beyond what is held, with no VRAM to take back (as the
    // keeper answers when the GPU has none): refused (ENOSPC) once the
    // room is gone, never written somewhere else.
    store.room_answer(false);
    let room = store.room_bytes() / EXTENT;
    let mut refused = 0;
    let mut e = 1;
    let mut written = Vec::new();
    while e < extents && refused == 0 {
        if e % 8 != 0 && !(lo..lo + (64 << 20)).contains(&(e * EXTENT)) {
            slice(sq.bufs.slot(0).expect("a buffer"))[..BLOCK as usize].fill(pattern(e));
            match one(&mut sq, Op::Write, e * EXTENT, BLOCK) {
                r if r == BLOCK as i32 => written.push(e),
                r if r == -libc::ENOSPC => refused += 1,
                r => {
                    println!("  write to extent {e}: {r}");
                    refused += 100;
                }
            }
        }
        e += 1;
    }
    out.push((
        format!(
            "with room for {room} more extents, {} new ones were written and the next refused with ENOSPC",
            written.len()
        ),
        refused == 1 && written.len() as u64 == room,
    ));

    // A later server gets exactly the chunks held, and finds every byte.
    let chunks = store.exported_chunks().unwrap_or_default();
    let borrowed: Vec<(usize, std::os::fd::BorrowedFd)> = chunks
        .iter()
        .map(|(l, f)| (*l, std::os::fd::AsFd::as_fd(f)))
        .collect();
    let imported = CudaStore::import(&CudaStoreOptions::new(store.size(), gpu), &borrowed);
    let (ok, text) = match &imported {
        Ok(b) => {
            b.set_erase_on_drop(false);
            let mut sq2 = SynthQueue::open(b, 2, 1);
            let same = written.iter().all(|&e| reads(&mut sq2, e, pattern(e)))
                && (0..extents)
                    .filter(|e| e % 8 == 0 && !(lo..lo + (64 << 20)).contains(&(e * EXTENT)))
                    .all(|e| reads(&mut sq2, e, pattern(e)));
            (
                same && b.held_bytes() == store.held_bytes(),
                format!("{} chunks, {} MiB held", chunks.len(), b.held_bytes() >> 20),
            )
        }
        Err(e) => (false, format!("import failed: {e}")),
    };
    drop(imported);
    drop(chunks);
    out.push((
        format!("import after the give-back ({text}): every extent where it was"),
        ok,
    ));

    // A write with no room while VRAM can be had waits for the keeper,
    // which takes VRAM back (here: all of it), then lands.
    store.room_answer(true);
    let (result, held) = std::thread::scope(|s| {
        let keeper = s.spawn(|| {
            if !store.wait_room_wanted(std::time::Duration::from_secs(10)) {
                return None;
            }
            let held = store.take_back(store.full_bytes(), 0).ok();
            store.open_held();
            store.room_answer(held.is_some());
            held
        });
        slice(sq.bufs.slot(0).expect("a buffer"))[..BLOCK as usize].fill(pattern(e));
        let r = one(&mut sq, Op::Write, e * EXTENT, BLOCK);
        (r, keeper.join().ok().flatten())
    });
    let more = result == BLOCK as i32 && reads(&mut sq, e, pattern(e));
    out.push((
        format!(
            "a write with no room waited while {} MiB were taken back, then landed and reads back",
            held.map(|h| h >> 20).unwrap_or(0)
        ),
        held == Some(store.full_bytes()) && more,
    ));
    drop(sq);
    out
}
