//! What the process costs the host with no I/O (issue 19): its CPU time
//! (every thread: the CUDA driver's own included) over a quiet stretch
//! with every store created and the timed shapes done. The queue loop
//! itself sleeps in io_uring when nothing is in flight (ublk-target's
//! queue.rs); the VM suite measures that for the whole server.

use crate::table::yes_no;
use std::time::{Duration, Instant};

/// CPU time (user + system) of the whole process so far.
fn process_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Sleeps `quiet` and returns the process's CPU time over it, with the
/// wall time it took.
pub fn cpu_over(quiet: Duration) -> (Duration, Duration) {
    let cpu = process_cpu();
    let wall = Instant::now();
    std::thread::sleep(quiet);
    (process_cpu() - cpu, wall.elapsed())
}

/// The report's line for it, beside issue 19's target (no measurable CPU:
/// below 0.1% of one core).
pub fn line(cpu: Duration, wall: Duration) -> String {
    let share = cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9);
    format!(
        "| process CPU with no I/O (4 stores open, every thread) | {:.1} ms over {:.1} s = {:.3}% of a core | < 0.1% | {} |\n",
        cpu.as_secs_f64() * 1e3,
        wall.as_secs_f64(),
        share * 100.0,
        yes_no(share < 0.001)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_judges_the_share_of_a_core() {
        // Not timed here: the test harness runs other tests' threads in
        // this process, so only the arithmetic is checked.
        let quiet = line(Duration::from_micros(500), Duration::from_secs(10));
        assert!(
            quiet.contains("0.5 ms over 10.0 s = 0.005% of a core") && quiet.ends_with("| yes |\n"),
            "{quiet}"
        );
        let busy = line(Duration::from_millis(150), Duration::from_millis(200));
        assert!(
            busy.contains("75.000% of a core") && busy.ends_with("| no |\n"),
            "{busy}"
        );
    }
}
