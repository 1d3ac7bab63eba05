//! Guest-side helper for the swap-pressure benchmark: "a small unrelated
//! task running beside the load". Every 50 ms it touches its own 1 MiB
//! (pages the kernel may have swapped out meanwhile) and reads
//! /proc/meminfo, timing each round; it stops after SECS seconds or when
//! /tmp/latprobe.stop appears, and prints the p50, p99 and worst round.
//!
//! usage: latprobe SECS

use std::time::{Duration, Instant};

const WORKING_SET: usize = 1 << 20;
const PAGE: usize = 4096;

fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(60);
    let mut mem = vec![1u8; WORKING_SET];
    let start = Instant::now();
    let mut rounds_us: Vec<u64> = Vec::new();
    let mut sum = 0u64;
    while start.elapsed() < Duration::from_secs(secs)
        && !std::path::Path::new("/tmp/latprobe.stop").exists()
    {
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        for i in (0..WORKING_SET).step_by(PAGE) {
            mem[i] = mem[i].wrapping_add(1);
            sum = sum.wrapping_add(u64::from(mem[i]));
        }
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        sum = sum.wrapping_add(meminfo.len() as u64);
        rounds_us.push(t.elapsed().as_micros() as u64);
    }
    rounds_us.sort_unstable();
    let at = |q: f64| -> u64 {
        if rounds_us.is_empty() {
            return 0;
        }
        let i = ((rounds_us.len() as f64 - 1.0) * q).round() as usize;
        rounds_us[i]
    };
    // `sum` keeps the touches from being optimised away.
    println!(
        "probe_rounds={} probe_p50_us={} probe_p99_us={} probe_max_us={} probe_sum={}",
        rounds_us.len(),
        at(0.5),
        at(0.99),
        rounds_us.last().copied().unwrap_or(0),
        sum % 10
    );
}
