//! The GPU kill-and-recover check (issue 4): VRAM outlives the process
//! that allocated it when another process holds its exported fds. A child
//! allocates the store and hands its chunks to this process (which never
//! initialises CUDA), writes a pattern through the real queue engine and is
//! SIGKILLed; each following child imports the chunks, checks every byte
//! of the last pattern, writes the next and is killed too; a last child
//! checks, erases and exits. This is what a recovering server does.
//!
//! Run it before anything in this process touches CUDA: the children are
//! forked.

use crate::load::{slice, Rng, SynthQueue};
use crate::packed::{discard_pieces, fill_packable, transfer};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;
use vramblk_cuda_store::{Compress, CudaStore, CudaStoreOptions, Resized, BACKOFF_STEP, EXTENT};
use vramblk_store::{handoff, Op, Request, Store};

const DEPTH: usize = 16;
const REQ: u64 = 512 << 10;

/// Byte `i` of the pattern of round `seed`: cheap, position-dependent and
/// different every round.
fn pattern_byte(seed: u64, i: u64) -> u8 {
    let x =
        (i / 8 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
    (x >> ((i % 8) * 8)) as u8
}

/// Writes round `seed`'s pattern over the whole store, or (write=false)
/// reads it all back and counts the bytes that differ.
fn sweep(store: &CudaStore, seed: u64, write: bool) -> u64 {
    sweep_bytes(store, write, |at| pattern_byte(seed, at))
}

/// Writes `byte(offset)` over the whole store, or (write=false) reads it
/// all back and counts the bytes that differ from it.
fn sweep_bytes(store: &CudaStore, write: bool, byte: impl Fn(u64) -> u8) -> u64 {
    sweep_in(store, 0, store.size(), write, &byte, |at, x| x == byte(at))
}

/// Writes pattern `byte` over [lo, hi).
fn sweep_range(store: &CudaStore, lo: u64, hi: u64, byte: impl Fn(u64) -> u8) {
    sweep_in(store, lo, hi, true, byte, |_, _| true);
}

/// Bytes of [lo, hi) that differ from pattern `seed`.
fn count_range(store: &CudaStore, lo: u64, hi: u64, seed: u64) -> u64 {
    let byte = |at| pattern_byte(seed, at);
    sweep_in(store, lo, hi, false, byte, |at, x| x == byte(at))
}

/// Whether every byte of [lo, hi) is pattern `a`'s or pattern `b`'s.
fn either_pattern(store: &CudaStore, lo: u64, hi: u64, a: u64, b: u64) -> bool {
    let fits = |at, x| x == pattern_byte(a, at) || x == pattern_byte(b, at);
    sweep_in(store, lo, hi, false, |_| 0, fits) == 0
}

/// Writes `byte(offset)` over [lo, hi), or (write=false) reads it back and
/// counts the bytes `fits(offset, byte)` refuses; a failed request counts
/// as REQ bad bytes.
fn sweep_in(
    store: &CudaStore,
    lo: u64,
    hi: u64,
    write: bool,
    byte: impl Fn(u64) -> u8,
    fits: impl Fn(u64, u8) -> bool,
) -> u64 {
    let mut sq = SynthQueue::open(store, 0, DEPTH);
    let mut bad = 0u64;
    let mut off = lo;
    while off < hi {
        let mut batch = Vec::new();
        for tag in 0..DEPTH {
            if off >= hi {
                break;
            }
            let len = REQ.min(hi - off);
            let buf = sq.bufs.slot(tag).expect("slot");
            let b = &mut slice(buf)[..len as usize];
            if write {
                for (k, x) in b.iter_mut().enumerate() {
                    *x = byte(off + k as u64);
                }
            } else {
                b.fill(0xA5);
            }
            sq.engine.enqueue(Request {
                tag: tag as u16,
                op: if write { Op::Write } else { Op::Read },
                offset: off,
                len: len as u32,
                buf,
            });
            batch.push((tag, off, len));
            off += len;
        }
        let mut failed = 0;
        sq.finish(|c| failed += u64::from(c.result < 0));
        bad += failed * REQ;
        if !write {
            for (tag, at, len) in batch {
                let b = &slice(sq.bufs.slot(tag).expect("slot"))[..len as usize];
                bad += b
                    .iter()
                    .enumerate()
                    .filter(|(k, x)| !fits(at + *k as u64, **x))
                    .count() as u64;
            }
        }
    }
    bad
}

/// In a child: creates a store of `size` bytes whose VRAM outlives it and
/// hands its chunks to the parent over `end` (or says why it could not).
fn create_and_hand_over(gpu: u32, size: u64, end: BorrowedFd) -> Result<CudaStore, i32> {
    create_with_and_hand_over(&CudaStoreOptions::new(size, gpu), end)
}

/// As [`create_and_hand_over`], a store made with `opts`.
fn create_with_and_hand_over(opts: &CudaStoreOptions, end: BorrowedFd) -> Result<CudaStore, i32> {
    let store = match CudaStore::create(opts) {
        Ok(s) => s,
        Err(e) => {
            let _ = handoff::send(end, &format!("ERR {e}"), &[]);
            return Err(2);
        }
    };
    store.set_erase_on_drop(false);
    let chunks = store.exported_chunks().map_err(|_| 4)?;
    let mut text = format!("VRAM {}", store.size());
    for (len, _) in &chunks {
        text.push_str(&format!(" {len}"));
    }
    let fds: Vec<BorrowedFd> = chunks.iter().map(|(_, f)| f.as_fd()).collect();
    handoff::send(end, &text, &fds).map_err(|_| 4)?;
    Ok(store)
}

/// In the parent: the store size and chunks a child handed over.
fn receive_chunks(holder: BorrowedFd) -> Result<(u64, Vec<(usize, OwnedFd)>), String> {
    let (text, fds) = handoff::recv(holder).map_err(|e| e.to_string())?;
    if let Some(why) = text.strip_prefix("ERR ") {
        return Err(why.to_string());
    }
    let mut words = text.split_whitespace().skip(1);
    let size: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
    let lens: Vec<usize> = words.filter_map(|w| w.parse().ok()).collect();
    Ok((size, lens.into_iter().zip(fds).collect()))
}

/// Runs `body` in a forked child; returns how it ended.
fn in_child(body: impl FnOnce() -> i32) -> Option<libc::c_int> {
    // SAFETY: this process has not initialised CUDA or started threads
    // that matter to the child; the child only runs `body` and exits.
    match unsafe { libc::fork() } {
        -1 => None,
        0 => {
            let code = body();
            std::process::exit(code);
        }
        pid => {
            let mut status = 0;
            // SAFETY: waiting for our own child.
            (unsafe { libc::waitpid(pid, &mut status, 0) } == pid).then_some(status)
        }
    }
}

fn die() -> i32 {
    // SAFETY: SIGKILL to ourselves, as a crash would.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    3
}

fn killed(status: Option<libc::c_int>) -> bool {
    status.is_some_and(|s| libc::WIFSIGNALED(s) && libc::WTERMSIG(s) == libc::SIGKILL)
}

fn exited_ok(status: Option<libc::c_int>) -> bool {
    status.is_some_and(|s| libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0)
}

/// The results, as (check, passed); an empty list with a reason when the
/// first child could not allocate (no GPU).
pub fn kill_and_recover(gpu: u32, size: u64, kills: u64) -> Result<Vec<(String, bool)>, String> {
    let (holder, child_end) = handoff::socket_pair().map_err(|e| e.to_string())?;
    let first = in_child(
        || match create_and_hand_over(gpu, size, child_end.as_fd()) {
            Ok(store) => {
                sweep(&store, 1, true);
                die()
            }
            Err(code) => code,
        },
    );
    let (got_size, chunks) = receive_chunks(holder.as_fd())?;
    let mut out = vec![(
        format!(
            "kill-and-recover: a child allocated {} MiB in {} chunks, handed them over, wrote a pattern and was SIGKILLed",
            got_size >> 20,
            chunks.len()
        ),
        killed(first),
    )];
    out.push(fd_store_keeps(&chunks));
    let borrowed =
        || -> Vec<(usize, BorrowedFd)> { chunks.iter().map(|(l, f)| (*l, f.as_fd())).collect() };
    for round in 1..=kills {
        let status = in_child(|| {
            let Ok(store) = CudaStore::import(&CudaStoreOptions::new(got_size, gpu), &borrowed())
            else {
                return 5;
            };
            store.set_erase_on_drop(false);
            if sweep(&store, round, false) != 0 {
                return 6;
            }
            sweep(&store, round + 1, true);
            die()
        });
        out.push((
            format!("kill-and-recover {round}: a new process imported the VRAM, found every byte of the dead one's pattern, wrote the next and was SIGKILLed"),
            killed(status),
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
    let last = in_child(|| {
        let Ok(store) = CudaStore::import(&CudaStoreOptions::new(got_size, gpu), &borrowed())
        else {
            return 5;
        };
        if sweep(&store, kills + 1, false) != 0 {
            return 6;
        }
        // Dropping it erases the VRAM, as a server does once its device is gone.
        0
    });
    out.push((
        "kill-and-recover: the last process found every byte, erased and released the VRAM".into(),
        exited_ok(last),
    ));
    Ok(out)
}

/// Whether systemd's fd store would keep these fds: it watches each stored
/// fd with epoll for EPOLLHUP/EPOLLERR and drops it when one comes, and
/// keeps fds epoll refuses (EPERM: not pollable). Done in the holder,
/// which never touched CUDA, as the service's main process does.
fn fd_store_keeps(chunks: &[(usize, OwnedFd)]) -> (String, bool) {
    // SAFETY: plain syscall; the fd is checked and closed below.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return ("fd store: epoll_create1 failed".into(), false);
    }
    let (mut refused, mut watched) = (0, 0);
    for (_, fd) in chunks {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: a valid epoll fd, a live fd and event.
        if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) } == 0 {
            watched += 1;
        } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
            refused += 1;
        }
    }
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 16];
    // SAFETY: a valid epoll fd and an array of 16 events.
    let ready = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 16, 200) };
    // SAFETY: closing the epoll fd created above.
    unsafe { libc::close(ep) };
    let kept = refused + watched == chunks.len() && ready == 0;
    (
        format!(
            "fd store: systemd would keep the {} exported VRAM fds ({refused} not pollable, {watched} watched, {} with HUP/ERR in 200 ms)",
            chunks.len(),
            ready.max(0)
        ),
        kept,
    )
}

/// Whether extent `e` keeps its data in the give-back check (1 in 4).
fn kept(e: u64) -> bool {
    e.is_multiple_of(4)
}

/// Reads the whole store: kept extents must hold round `seed`'s pattern,
/// the others zeros. Returns the bytes that differ.
fn check_kept(store: &CudaStore, seed: u64) -> u64 {
    sweep_bytes(store, false, |at| {
        if kept(at / EXTENT) {
            pattern_byte(seed, at)
        } else {
            0
        }
    })
}

/// Discards every extent that is not kept.
fn discard_unkept(store: &CudaStore) -> bool {
    let mut sq = SynthQueue::open(store, 2, 1);
    let mut ok = true;
    for e in (0..store.size() / EXTENT).filter(|&e| !kept(e)) {
        sq.engine.enqueue(Request {
            tag: 0,
            op: Op::Discard,
            offset: e * EXTENT,
            len: EXTENT as u32,
            buf: sq.bufs.slot(0).expect("slot"),
        });
        sq.finish(|c| ok &= c.result >= 0);
    }
    ok
}

/// A server killed while it gives VRAM back (moving extents out of the
/// last chunks) loses nothing: a child writes a pattern over a 1 GiB
/// store, discards 3 extents in 4 and is SIGKILLed `after` into giving
/// everything unused back; a second child imports what the first handed
/// over, takes over (re-reads the map, zeroes free slots) and must find
/// every kept byte and zeros elsewhere, then gives back for real and
/// checks again.
pub fn kill_during_give_back(gpu: u32, after: Duration) -> (String, bool) {
    let name = format!(
        "killed {} us into a give-back, then imported by a new process: every kept byte, zeros elsewhere, and the give-back then completes",
        after.as_micros()
    );
    killed_mid_give_back(
        name,
        &CudaStoreOptions::new(1 << 30, gpu),
        after,
        |store| {
            sweep(store, 11, true);
            discard_unkept(store)
        },
        |store| check_kept(store, 11) == 0,
        |r| r.after < r.before,
    )
}

/// The kill checks' shape: a child makes a store with `opts`, hands its
/// chunks over, runs `prepare` on it (false: it exits 7) and is SIGKILLed
/// `after` into a give-back to nothing; a second child imports the chunks
/// and takes over, and the store must be `intact` before and after a give-
/// back of its own, which must have `shrunk` it. The name given, and
/// whether both went so.
fn killed_mid_give_back(
    name: String,
    opts: &CudaStoreOptions,
    after: Duration,
    prepare: impl FnOnce(&CudaStore) -> bool,
    intact: impl Fn(&CudaStore) -> bool,
    shrunk: impl FnOnce(&Resized) -> bool,
) -> (String, bool) {
    let Ok((holder, child_end)) = handoff::socket_pair() else {
        return (format!("{name}: no socket pair"), false);
    };
    let first = in_child(|| {
        let store = match create_with_and_hand_over(opts, child_end.as_fd()) {
            Ok(s) => s,
            Err(code) => return code,
        };
        if !prepare(&store) {
            return 7;
        }
        std::thread::spawn(move || {
            std::thread::sleep(after);
            die()
        });
        let _ = store.give_back(0);
        std::thread::sleep(Duration::from_secs(5));
        die()
    });
    let (size, chunks) = match receive_chunks(holder.as_fd()) {
        Ok(got) => got,
        Err(e) => {
            return (
                format!("{name}: no handoff ({e}; first child {first:?})"),
                false,
            )
        }
    };
    let second = in_child(|| {
        let borrowed: Vec<(usize, BorrowedFd)> =
            chunks.iter().map(|(l, f)| (*l, f.as_fd())).collect();
        let opts = CudaStoreOptions {
            size,
            ..opts.clone()
        };
        let Ok(mut store) = CudaStore::import(&opts, &borrowed) else {
            return 5;
        };
        if store.take_over().is_err() {
            return 8;
        }
        if !intact(&store) {
            return 6;
        }
        match store.give_back(0) {
            Ok(r) if shrunk(&r) => {}
            _ => return 9,
        }
        if !intact(&store) {
            return 10;
        }
        0
    });
    let code = second
        .filter(|s| libc::WIFEXITED(*s))
        .map(|s| libc::WEXITSTATUS(s));
    (
        if code == Some(0) {
            name
        } else {
            format!("{name} (second child: {second:?})")
        },
        killed(first) && code == Some(0),
    )
}

/// The compressed store of the compaction kill check: 1 GiB, integrity on.
fn packed_options(gpu: u32) -> CudaStoreOptions {
    CudaStoreOptions {
        integrity: Some(true),
        compress: Compress::Lz,
        ..CudaStoreOptions::new(1 << 30, gpu)
    }
}

/// Bytes of the compaction kill check's pages, and the piece it writes and
/// checks at a time (each from its own seed, so no process holds it all).
const PACKED_DATA: u64 = 900 << 20;
const PACKED_PIECE: u64 = 60 << 20;

/// Which 64 KiB pieces the compaction kill check discards: 3 in 4.
fn discarded(piece: u64) -> bool {
    !piece.is_multiple_of(4)
}

/// Piece `i` of the compaction kill check's pages: before the discards
/// (`after_discards` false) or after.
fn packed_piece(seed: u64, i: u64, after_discards: bool) -> Vec<u8> {
    let mut b = vec![0u8; PACKED_PIECE as usize];
    fill_packable(&mut b, &mut Rng((seed << 16) + i + 1));
    if after_discards {
        let first = i * PACKED_PIECE / (64 << 10);
        for (k, p) in b.chunks_mut(64 << 10).enumerate() {
            if discarded(first + k as u64) {
                p.fill(0);
            }
        }
    }
    b
}

/// Whether the store holds the compaction kill check's pages of `seed`
/// after the discards, every byte.
fn packed_intact(store: &CudaStore, seed: u64) -> bool {
    (0..PACKED_DATA / PACKED_PIECE).all(|i| {
        let want = packed_piece(seed, i, true);
        let mut got = vec![0xA5u8; want.len()];
        transfer(store, Op::Read, i * PACKED_PIECE, &mut got) && got == want
    })
}

/// A server killed while a give-back compacts a compressed device's pool
/// loses nothing: a child writes pages that shrink by varied amounts over
/// 900 MiB of a 1 GiB lz store (its pool spills into the second chunk),
/// discards 3 of every 4 64 KiB pieces and is SIGKILLed `after` into
/// giving everything unused back (the blocks moving, then the extents); a
/// second child imports the VRAM, takes over (the page map read back),
/// must read every kept byte and zeros elsewhere, then gives back for real
/// down to one chunk and reads it all again.
pub fn kill_during_compaction(gpu: u32, after: Duration) -> (String, bool) {
    let name = format!(
        "compress Lz: killed {} ms into a give-back that compacts the pool, then imported by a \
         new process: every kept byte, zeros where discarded, and the give-back then frees the \
         second chunk",
        after.as_millis()
    );
    let seed = 0x7F0;
    killed_mid_give_back(
        name,
        &packed_options(gpu),
        after,
        |store| {
            (0..PACKED_DATA / PACKED_PIECE).all(|i| {
                let mut piece = packed_piece(seed, i, false);
                transfer(store, Op::Write, i * PACKED_PIECE, &mut piece)
            }) && discard_pieces(store, 0, 0, PACKED_DATA, discarded)
        },
        |store| packed_intact(store, seed),
        |r| r.after <= BACKOFF_STEP,
    )
}

/// A kernel that stores to address 0: an illegal address, which breaks the
/// context it runs in for good, as a faulting kernel or an Xid does.
const POISON_PTX: &str = r#"
.version 7.0
.target sm_70
.address_size 64

.visible .entry poison()
{
    .reg .u64 %rd<2>;
    mov.u64 %rd1, 0;
    st.global.u32 [%rd1], 1;
    ret;
}
"#;

/// Breaks the current context: launches `poison` and waits for it; true
/// when the context reports the illegal address, as it should.
fn poison_context() -> bool {
    use cudarc::driver::result::{self, DriverError};
    use cudarc::driver::sys;
    let Ok(src) = std::ffi::CString::new(POISON_PTX) else {
        return false;
    };
    // SAFETY: a NUL-terminated image; a kernel with no parameters launched
    // on the current context's null stream.
    unsafe {
        let Ok(module) = result::module::load_data(src.as_ptr().cast()) else {
            return false;
        };
        let Ok(function) = result::module::get_function(module, c"poison".into()) else {
            return false;
        };
        let launched = result::launch_kernel(
            function,
            (1, 1, 1),
            (1, 1, 1),
            0,
            result::stream::null(),
            &mut [],
        );
        launched.is_ok()
            && result::ctx::synchronize()
                == Err(DriverError(sys::CUresult::CUDA_ERROR_ILLEGAL_ADDRESS))
    }
}

/// The context-fatal check (issue 15): a child creates a store, hands its
/// VRAM over and writes a pattern; then a kernel faults in its context
/// (an illegal address, for real) and the child writes the next pattern
/// over the first half: the store must end the process (exit 75) without
/// answering those writes. A new process imports the VRAM on a fresh
/// context: the second half holds the first pattern exactly, the first
/// half either pattern byte for byte (the writes were never answered, so
/// the kernel would issue them again); it issues them again and then every
/// byte is what was written last.
pub fn context_lost(gpu: u32, size: u64) -> (String, bool) {
    let name = "a real illegal-address fault in the store's context mid-load: the server ends \
                (exit 75) without answering; a new process on a fresh context finds the first \
                pattern intact, re-issues the unanswered writes, and every byte is right";
    let (holder, child_end) = match handoff::socket_pair() {
        Ok(p) => p,
        Err(e) => return (format!("{name}: {e}"), false),
    };
    // The writes lost with the context: DEPTH requests of REQ bytes.
    let half = (DEPTH as u64 * REQ).min(size / 2);
    let first = in_child(
        || match create_and_hand_over(gpu, size, child_end.as_fd()) {
            Ok(store) => {
                if store.gpu_name().contains("stub") {
                    return 9;
                }
                sweep(&store, 1, true);
                // The queue is open before the fault, as a serving one is.
                let mut sq = SynthQueue::open(&store, 1, DEPTH);
                if !poison_context() {
                    return 7;
                }
                // Writes of pattern 2 over the first half: the driver reports
                // the lost context, and the store ends this process.
                for (tag, at) in (0..half).step_by(REQ as usize).take(DEPTH).enumerate() {
                    let buf = sq.bufs.slot(tag).expect("slot");
                    for (k, x) in slice(buf)[..REQ as usize].iter_mut().enumerate() {
                        *x = pattern_byte(2, at + k as u64);
                    }
                    sq.engine.enqueue(Request {
                        tag: tag as u16,
                        op: Op::Write,
                        offset: at,
                        len: REQ as u32,
                        buf,
                    });
                }
                sq.finish(|_| {});
                8
            }
            Err(code) => code,
        },
    );
    let (got_size, chunks) = match receive_chunks(holder.as_fd()) {
        Ok(c) => c,
        Err(e) => return (format!("{name}: {e}"), false),
    };
    let exited = |code| first.is_some_and(|s| libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == code);
    if exited(9) {
        return (
            format!("SKIPPED on the stand-in libcuda (its copy kernel runs on the CPU; the VM suite injects this fault with VRAMBLK_STUB_FAIL): {name}"),
            true,
        );
    }
    if !exited(vramblk_cuda_store::CONTEXT_LOST_EXIT) {
        return (
            format!("{name}: the first process ended with {first:?}"),
            false,
        );
    }
    let borrowed: Vec<(usize, BorrowedFd)> = chunks.iter().map(|(l, f)| (*l, f.as_fd())).collect();
    let next = in_child(|| {
        let Ok(store) = CudaStore::import(&CudaStoreOptions::new(got_size, gpu), &borrowed) else {
            return 5;
        };
        if !either_pattern(&store, 0, half, 1, 2) || count_range(&store, half, size, 1) != 0 {
            return 6;
        }
        sweep_range(&store, 0, half, |at| pattern_byte(2, at));
        let bad = count_range(&store, 0, half, 2) + count_range(&store, half, size, 1);
        i32::from(bad != 0) * 6
    });
    (name.to_string(), exited_ok(next))
}
