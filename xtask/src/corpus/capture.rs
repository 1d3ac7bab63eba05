//! Reading what a process would hand to swap: its private anonymous pages
//! that are resident now (heap, stack, anonymous mappings), from
//! /proc/PID/maps, /proc/PID/pagemap (which pages are present) and
//! /proc/PID/mem. Pages never touched are not resident and never swapped,
//! so they are left out rather than read as zeros.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

pub const PAGE: usize = 4096;

/// Bit 63 of a pagemap entry: the page is in RAM.
const PRESENT: u64 = 1 << 63;

/// One mapping of /proc/PID/maps that swap could take pages from.
#[derive(Debug, PartialEq, Eq)]
struct Region {
    start: u64,
    end: u64,
}

/// The private, writable, anonymous mappings of a maps text: no backing
/// file (or the heap, a stack, a named anonymous mapping).
fn anonymous_regions(maps: &str) -> Vec<Region> {
    maps.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let path = f.nth(3).unwrap_or("");
            let anonymous = path.is_empty()
                || path == "[heap]"
                || path.starts_with("[stack")
                || path.starts_with("[anon");
            if !(perms.starts_with("rw") && perms.ends_with('p') && anonymous) {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some(Region {
                start: u64::from_str_radix(a, 16).ok()?,
                end: u64::from_str_radix(b, 16).ok()?,
            })
        })
        .collect()
}

/// Appends up to `limit` bytes of `pid`'s resident anonymous pages to
/// `out`; how many pages it wrote. Pages that cannot be read (a mapping
/// gone meanwhile) are skipped.
pub fn resident_anon_pages(pid: u32, limit: u64, out: &mut impl Write) -> Result<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("reading /proc/{pid}/maps"))?;
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))
        .with_context(|| format!("opening /proc/{pid}/pagemap"))?;
    let mem = File::open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("opening /proc/{pid}/mem"))?;
    let max_pages = limit / PAGE as u64;
    let mut written = 0u64;
    let mut entries = Vec::new();
    let mut page = vec![0u8; PAGE];
    for r in anonymous_regions(&maps) {
        let first = r.start / PAGE as u64;
        let count = ((r.end - r.start) / PAGE as u64) as usize;
        entries.resize(count * 8, 0);
        if pagemap.read_exact_at(&mut entries, first * 8).is_err() {
            continue;
        }
        for (i, e) in entries.chunks_exact(8).enumerate() {
            if written >= max_pages {
                return Ok(written);
            }
            let entry = u64::from_ne_bytes(e.try_into().expect("8 bytes"));
            if entry & PRESENT == 0 {
                continue;
            }
            let at = r.start + (i * PAGE) as u64;
            if mem.read_exact_at(&mut page, at).is_ok() {
                out.write_all(&page)?;
                written += 1;
            }
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_private_writable_anonymous_mappings_count() {
        let maps = "\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000004000 rw-p 00000000 00:00 0 
7f0000004000-7f0000008000 r--p 00000000 08:01 123                        /usr/lib/libc.so.6
7f0000008000-7f000000a000 rw-p 00002000 08:01 123                        /usr/lib/libc.so.6
7f000000a000-7f000000b000 rw-s 00000000 00:01 9                          /memfd:x (deleted)
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
7f000000c000-7f000000d000 ---p 00000000 00:00 0 
";
        let r = anonymous_regions(maps);
        let starts: Vec<u64> = r.iter().map(|r| r.start).collect();
        assert_eq!(starts, vec![0x55d0c0000000, 0x7f0000000000, 0x7ffc00000000]);
        assert_eq!(r[1].end, 0x7f0000004000);
    }

    #[test]
    fn captures_resident_pages_of_a_process_and_stops_at_the_limit() {
        // Page-aligned pages with a mark no untouched page has; all
        // resident (written).
        #[repr(align(4096))]
        struct Aligned([u8; PAGE]);
        let marked: Vec<Aligned> = (1..=64u8)
            .map(|k| {
                let mut p = [k; PAGE];
                p[0] = 0xA5;
                Aligned(p)
            })
            .collect();
        let mut out = Vec::new();
        let pages = resident_anon_pages(std::process::id(), u64::MAX, &mut out).unwrap();
        assert_eq!(out.len() as u64, pages * PAGE as u64);
        // Each mark at least once (building them left copies on the stack,
        // which is anonymous memory too).
        let mut seen: Vec<u8> = out
            .chunks_exact(PAGE)
            .filter(|p| p[0] == 0xA5 && p[1] == p[4095] && (1..=64).contains(&p[1]))
            .map(|p| p[1])
            .collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 64, "every marked page");
        let mut few = Vec::new();
        assert_eq!(
            resident_anon_pages(std::process::id(), 3 * PAGE as u64, &mut few).unwrap(),
            3
        );
        assert_eq!(few.len(), 3 * PAGE);
        assert_eq!(
            marked.iter().map(|a| a.0[1] as usize).sum::<usize>(),
            64 * 65 / 2
        );
    }
}
