//! Guest-side helper for the crash boot: pushes a tmpfs file's pages out to
//! swap, so a test can put a file where a take-over must not need it: in
//! swap on the device being taken over. MADV_PAGEOUT on a shared mapping of
//! it writes the pages to swap, but a shmem page written so stays in the
//! swap cache (resident) until reclaim frees it; so then memory is
//! reclaimed through the root cgroup's memory.reclaim (cgroup2 mounted on
//! /sys/fs/cgroup) until the pages are gone or 10 s passed. Prints how
//! many of its pages are still resident after (in memory or the swap
//! cache; 0 when all are in swap alone).
//!
//! usage: pageout FILE

use std::os::fd::AsRawFd;

/// Proactive reclaim for the whole machine (the root cgroup).
const RECLAIM: &str = "/sys/fs/cgroup/memory.reclaim";

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: pageout FILE");
        std::process::exit(2);
    };
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("pageout: {path}: {e}");
            std::process::exit(1);
        }
    };
    let len = file.metadata().map(|m| m.len() as usize).unwrap_or(0);
    if len == 0 {
        eprintln!("pageout: {path} is empty");
        std::process::exit(1);
    }
    let page = 4096;
    let pages = len.div_ceil(page);
    // SAFETY: a read-only shared mapping of a file we hold open, unmapped
    // below; the madvise and mincore calls take its address and length.
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        if at == libc::MAP_FAILED {
            eprintln!("pageout: mmap: {}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
        // Fault every page in: MADV_PAGEOUT takes the pages this mapping
        // maps.
        let mut sum = 0u8;
        for p in 0..pages {
            sum = sum.wrapping_add(std::ptr::read_volatile((at as *const u8).add(p * page)));
        }
        std::hint::black_box(sum);
        let began = std::time::Instant::now();
        if libc::madvise(at, len, libc::MADV_PAGEOUT) != 0 {
            eprintln!("pageout: madvise: {}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
        let mut resident = vec![0u8; pages];
        let mut kept = pages;
        for _ in 0..100 {
            std::thread::sleep(std::time::Duration::from_millis(100));
            libc::mincore(at, len, resident.as_mut_ptr());
            kept = resident.iter().filter(|r| **r & 1 != 0).count();
            if kept == 0 {
                break;
            }
            // The written pages sit at the inactive list's tail: a little
            // reclaim takes them first. Short of its goal it says EAGAIN,
            // which is no matter here.
            if let Err(e) = std::fs::write(RECLAIM, "16M") {
                if e.raw_os_error() != Some(libc::EAGAIN) {
                    eprintln!("pageout: {RECLAIM}: {e}");
                    break;
                }
            }
        }
        libc::munmap(at, len);
        println!(
            "{path}: {kept} of {pages} pages resident after {} ms",
            began.elapsed().as_millis()
        );
    }
}
