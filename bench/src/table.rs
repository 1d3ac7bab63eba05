//! The benchmark's rows, their Markdown table and the targets.

use vramblk_cuda_store::stages::{Stage, StageTotals};

/// The mode column of the nbd-vram-shaped baseline rows.
pub const BASELINE: &str = "baseline";

/// The mode column of the auto store without page checksums.
pub const INTEGRITY_OFF: &str = "auto-integrity-off";

/// One measured shape.
#[derive(Clone, Debug)]
pub struct Row {
    pub name: String,
    pub mode: String,
    pub read: bool,
    pub bs: u64,
    pub queues: u16,
    pub depth: usize,
    pub iops: f64,
    pub gbps: f64,
    pub p50: f64,
    pub p99: f64,
    pub errors: u64,
    /// Host CPU time of the queue threads per I/O, in us (their thread CPU
    /// clocks: the engine, its polling, and the synthetic load's few
    /// instructions per request; no io_uring).
    pub cpu_us_per_io: f64,
    /// Where the store's rounds spent their time (cuda-store's stages).
    pub stages: StageTotals,
}

impl Row {
    fn is_4k_random(&self) -> bool {
        self.bs == 4096 && self.name.contains("rand")
    }
}

/// A report's "met" column.
pub fn yes_no(met: bool) -> &'static str {
    if met {
        "yes"
    } else {
        "no"
    }
}

/// IOPS of the baseline row for the row's direction.
fn baseline_iops(rows: &[Row], read: bool) -> Option<f64> {
    rows.iter()
        .find(|r| r.mode == BASELINE && r.read == read)
        .map(|r| r.iops)
}

pub fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| shape | copy mode | queues x depth | IOPS | GB/s | p50 us | p99 us | host CPU us/IO | vs nbd-vram shape |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        let ratio = match baseline_iops(rows, r.read) {
            Some(b) if r.is_4k_random() && b > 0.0 && !r.name.contains("70/30") => {
                format!("{:.1}x", r.iops / b)
            }
            _ => "-".into(),
        };
        let errors = if r.errors > 0 {
            format!(" ({} errors)", r.errors)
        } else {
            String::new()
        };
        t += &format!(
            "| {}{errors} | {} | {} x {} | {:.0} | {:.2} | {:.1} | {:.1} | {:.2} | {ratio} |\n",
            r.name, r.mode, r.queues, r.depth, r.iops, r.gbps, r.p50, r.p99, r.cpu_us_per_io
        );
    }
    t
}

/// The row of `mode` for one direction and queue shape (not the 70/30
/// mix, which shares the shape).
fn find_row<'a>(
    rows: &'a [Row],
    mode: &str,
    bs: u64,
    read: bool,
    q: u16,
    d: usize,
) -> Option<&'a Row> {
    rows.iter().find(|r| {
        r.mode == mode
            && r.bs == bs
            && r.read == read
            && r.queues == q
            && r.depth == d
            && !r.name.contains("70/30")
    })
}

/// What the issue asks of the default (auto) mode, measured.
pub fn targets(rows: &[Row], mode: &str) -> String {
    let find = |bs, read, q, d| find_row(rows, mode, bs, read, q, d);
    let mut t = String::from("| target | measured | met |\n| --- | --- | --- |\n");
    let mut line = |what: String, got: Option<f64>, unit: &str, ok: &dyn Fn(f64) -> bool| {
        let (text, met) = match got {
            Some(v) => (format!("{v:.2}{unit}"), yes_no(ok(v))),
            None => ("not measured".into(), "no"),
        };
        t += &format!("| {what} | {text} | {met} |\n");
    };
    type Measure = fn(&Row, Option<f64>) -> Option<f64>;
    /// What, block size, queues, depth, measure, unit, met.
    type Target<'a> = (&'a str, u64, u16, usize, Measure, &'a str, fn(f64) -> bool);
    let iops_m: Measure = |r, _| Some(r.iops / 1e6);
    let ratio: Measure = |r, base| base.map(|b| r.iops / b);
    let gbps: Measure = |r, _| Some(r.gbps);
    let p50: Measure = |r, _| Some(r.p50);
    let targets: [Target; 5] = [
        (
            "4 KiB random {dir}, 16 queues x depth 128 >= 5 M IOPS",
            4096,
            16,
            128,
            iops_m,
            " M",
            |v| v >= 5.0,
        ),
        (
            "4 KiB random {dir}, 1 queue x depth 32 >= 1.5 M IOPS",
            4096,
            1,
            32,
            iops_m,
            " M",
            |v| v >= 1.5,
        ),
        (
            "4 KiB random {dir} (16 x 128) >= 20x the nbd-vram-shaped baseline",
            4096,
            16,
            128,
            ratio,
            "x",
            |v| v >= 20.0,
        ),
        (
            "512 KiB sequential {dir} >= 40 GB/s",
            512 << 10,
            4,
            32,
            gbps,
            " GB/s",
            |v| v >= 40.0,
        ),
        (
            "QD1 4 KiB {dir}, submit to completion seen by the queue, p50 <= 12 us",
            4096,
            1,
            1,
            p50,
            " us",
            |v| v <= 12.0,
        ),
    ];
    for (what, bs, q, d, measure, unit, met) in targets {
        for read in [false, true] {
            let dir = if read { "read" } else { "write" };
            let got = find(bs, read, q, d).and_then(|r| measure(r, baseline_iops(rows, read)));
            line(what.replace("{dir}", dir), got, unit, &met);
        }
    }
    t
}

/// Issue 15's targets for the page checksums: the auto rows (checksums
/// on) against the auto rows without them, from the same run.
pub fn integrity_cost(rows: &[Row]) -> String {
    let find = |mode, bs, read, q, d| find_row(rows, mode, bs, read, q, d);
    let mut t = String::from(
        "| shape | checksums on | off | on / off | target | met |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    for read in [false, true] {
        let dir = if read { "read" } else { "write" };
        for (name, bs, q, d, least) in [
            ("4 KiB random", 4096u64, 16u16, 128usize, 0.9),
            ("4 KiB random", 4096, 1, 32, 0.9),
            ("512 KiB sequential", 512 << 10, 4, 32, 0.95),
        ] {
            let (on, off) = (
                find("auto", bs, read, q, d),
                find(INTEGRITY_OFF, bs, read, q, d),
            );
            let (a, b, ratio, met) = match (on, off) {
                (Some(a), Some(b)) if b.iops > 0.0 => {
                    let r = a.iops / b.iops;
                    (a.iops, b.iops, format!("{r:.2}x"), r >= least)
                }
                _ => (0.0, 0.0, "not measured".into(), false),
            };
            t += &format!(
                "| {name} {dir} {q} x {d} | {:.0} IOPS | {:.0} IOPS | {ratio} | >= {least}x | {} |\n",
                a,
                b,
                yes_no(met)
            );
        }
        let (on, off) = (
            find("auto", 4096, read, 1, 1),
            find(INTEGRITY_OFF, 4096, read, 1, 1),
        );
        let (text, met) = match (on, off) {
            (Some(a), Some(b)) => {
                let more = a.p50 - b.p50;
                (
                    format!("{:.1} us | {:.1} us | {more:+.1} us", a.p50, b.p50),
                    more <= 1.0,
                )
            }
            _ => ("- | - | not measured".into(), false),
        };
        t += &format!(
            "| QD1 4 KiB {dir} p50 | {text} | at most +1 us | {} |\n",
            yes_no(met)
        );
    }
    t
}

/// What the queue threads cost the host CPU per I/O at each shape of
/// `mode`, beside issue 19's target (at most 1 us per 4 KiB I/O at 16
/// queues x 128).
pub fn host_cpu(rows: &[Row], mode: &str) -> String {
    let mut t = String::from(
        "| shape | queues x depth | host CPU us/IO | busy cores (CPU s per s) | target | met |\n\
         | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows.iter().filter(|r| r.mode == mode) {
        let busy = r.cpu_us_per_io * r.iops / 1e6;
        let (target, met) = if r.is_4k_random() && r.queues == 16 && r.depth == 128 {
            ("<= 1 us", yes_no(r.cpu_us_per_io <= 1.0))
        } else {
            ("-", "-")
        };
        t += &format!(
            "| {} | {} x {} | {:.2} | {busy:.1} | {target} | {met} |\n",
            r.name, r.queues, r.depth, r.cpu_us_per_io
        );
    }
    t
}

/// Where the 4 KiB random shapes' rounds spend their time, per round and
/// per I/O: the store's CPU stages against the queue thread's whole CPU
/// (the rest is polling and the synthetic load), and the GPU's part.
pub fn stage_times(rows: &[Row], mode: &str) -> String {
    let mut t = String::from(
        "| shape | queues x depth | requests per round | translate | build | launch | gpu | finish | store CPU us/IO | thread CPU us/IO | rest (polling, load) us/IO |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows
        .iter()
        .filter(|r| r.mode == mode && r.is_4k_random() && r.stages.rounds > 0)
    {
        let s = &r.stages;
        let cpu_ns: u64 = [Stage::Translate, Stage::Build, Stage::Launch, Stage::Finish]
            .iter()
            .map(|&st| s.nanos[st as usize])
            .sum();
        let store_cpu = cpu_ns as f64 / 1e3 / s.requests.max(1) as f64;
        t += &format!(
            "| {} | {} x {} | {:.1} | {} | {store_cpu:.2} | {:.2} | {:.2} |\n",
            r.name,
            r.queues,
            r.depth,
            s.requests_per_round(),
            per_round_cells(s, &Stage::ALL, |us| format!("{us:.2} us")),
            r.cpu_us_per_io,
            (r.cpu_us_per_io - store_cpu).max(0.0)
        );
    }
    t
}

/// `s`'s mean time per round in each of `stages`, as table cells.
fn per_round_cells(s: &StageTotals, stages: &[Stage], cell: impl Fn(f64) -> String) -> String {
    let cells: Vec<String> = stages.iter().map(|&st| cell(s.us_per_round(st))).collect();
    cells.join(" | ")
}

/// Where a compressed store's rounds spend their time (cuda-store's
/// stages for compressed queues), per round, for each `(content, row)`.
pub fn packed_stage_times<'a>(rows: impl Iterator<Item = (&'a str, &'a Row)>) -> String {
    let names: Vec<&str> = Stage::PACKED.iter().map(|s| s.name()).collect();
    let mut t = format!(
        "| content | shape | queues x depth | rounds | requests per round | {} (us per round) |\n| --- | --- | --- | --- | --- |{}\n",
        names.join(" | "),
        " --- |".repeat(names.len())
    );
    for (what, r) in rows.filter(|(_, r)| r.stages.rounds > 0) {
        let s = &r.stages;
        t += &format!(
            "| {what} | {} | {} x {} | {} | {:.1} | {} |\n",
            r.name,
            r.queues,
            r.depth,
            s.rounds,
            s.requests_per_round(),
            per_round_cells(s, &Stage::PACKED, |us| format!("{us:.1}"))
        );
    }
    t
}

/// The polling policies side by side (rows from `load::poll_policies`,
/// whose mode column names the policy): rate, latency and the thread's CPU.
pub fn variants_table(rows: &[Row], what: &str) -> String {
    let mut t = format!(
        "| shape | queues x depth | {what} | IOPS | p50 us | p99 us | host CPU us/IO | busy cores |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        t += &format!(
            "| {} | {} x {} | {} | {:.0} | {:.1} | {:.1} | {:.2} | {:.1} |\n",
            r.name,
            r.queues,
            r.depth,
            r.mode,
            r.iops,
            r.p50,
            r.p99,
            r.cpu_us_per_io,
            r.cpu_us_per_io * r.iops / 1e6
        );
    }
    t
}

/// A measured row for the tables' tests: `mode`, direction, block size,
/// queues x depth and IOPS; p50 8 us, p99 20 us, 0.5 us of CPU per I/O.
#[cfg(test)]
pub(crate) fn test_row(mode: &str, read: bool, bs: u64, q: u16, d: usize, iops: f64) -> Row {
    Row {
        name: format!("{} KiB rand", bs >> 10),
        mode: mode.into(),
        read,
        bs,
        queues: q,
        depth: d,
        iops,
        gbps: iops * bs as f64 / 1e9,
        p50: 8.0,
        p99: 20.0,
        errors: 0,
        cpu_us_per_io: 0.5,
        stages: StageTotals::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_read_the_auto_rows_against_the_baseline() {
        let rows = vec![
            test_row(BASELINE, false, 4096, 1, 1, 100_000.0),
            test_row(BASELINE, true, 4096, 1, 1, 100_000.0),
            test_row("auto", false, 4096, 16, 128, 6e6),
            test_row("auto", true, 4096, 16, 128, 4e6),
            test_row("dma", true, 4096, 16, 128, 9e6),
        ];
        let t = targets(&rows, "auto");
        assert!(
            t.contains("| 4 KiB random write, 16 queues x depth 128 >= 5 M IOPS | 6.00 M | yes |")
        );
        assert!(
            t.contains("| 4 KiB random read, 16 queues x depth 128 >= 5 M IOPS | 4.00 M | no |")
        );
        assert!(t.contains("baseline | 60.00x | yes |"));
        assert!(t.contains("| 512 KiB sequential read >= 40 GB/s | not measured | no |"));
        let table = table(&rows);
        assert!(table.contains(
            "| 4 KiB rand | dma | 16 x 128 | 9000000 | 36.86 | 8.0 | 20.0 | 0.50 | 90.0x |"
        ));
    }

    #[test]
    fn stage_times_split_a_round_and_the_threads_cpu() {
        let mut r = test_row("auto", false, 4096, 16, 128, 6e6);
        // 10 rounds of 40 requests: 2 us translate, 1 us build, 0.5 us
        // launch, 12 us on the GPU, 0.5 us finish per round.
        r.stages = StageTotals {
            nanos: [20_000, 10_000, 5_000, 120_000, 5_000, 0, 0, 0, 0, 0],
            rounds: 10,
            requests: 400,
        };
        let mut idle = test_row("auto", true, 4096, 1, 32, 1e6);
        idle.stages = StageTotals::default();
        let rows = vec![r, idle, test_row("dma", true, 4096, 16, 128, 9e6)];
        let t = stage_times(&rows, "auto");
        // Store CPU: 40 us over 400 requests = 0.10 us; the thread's 0.50
        // leaves 0.40 to polling and the load.
        assert!(
            t.contains(
                "| 4 KiB rand | 16 x 128 | 40.0 | 2.00 us | 1.00 us | 0.50 us | 12.00 us | 0.50 us | 0.10 | 0.50 | 0.40 |"
            ),
            "{t}"
        );
        assert_eq!(
            t.lines().count(),
            3,
            "rows without rounds and dma left out: {t}"
        );
    }

    #[test]
    fn the_policy_table_has_a_row_per_policy_and_shape() {
        let mut napping = test_row("nap 20 us at once", false, 4096, 16, 128, 5e6);
        napping.cpu_us_per_io = 0.2;
        let rows = vec![test_row("spin only", false, 4096, 16, 128, 6e6), napping];
        let t = variants_table(&rows, "policy");
        assert!(
            t.contains("| 4 KiB rand | 16 x 128 | spin only | 6000000 | 8.0 | 20.0 | 0.50 | 3.0 |"),
            "{t}"
        );
        assert!(
            t.contains(
                "| 4 KiB rand | 16 x 128 | nap 20 us at once | 5000000 | 8.0 | 20.0 | 0.20 | 1.0 |"
            ),
            "{t}"
        );
        assert_eq!(t.lines().count(), 4);
    }

    #[test]
    fn host_cpu_judges_the_16_by_128_rows_against_one_us() {
        let mut slow = test_row("auto", true, 4096, 16, 128, 4e6);
        slow.cpu_us_per_io = 1.5;
        let rows = vec![
            test_row("auto", false, 4096, 16, 128, 6e6),
            slow,
            test_row("auto", true, 4096, 1, 32, 1e6),
            test_row("dma", true, 4096, 16, 128, 9e6),
        ];
        let t = host_cpu(&rows, "auto");
        assert!(
            t.contains("| 4 KiB rand | 16 x 128 | 0.50 | 3.0 | <= 1 us | yes |"),
            "{t}"
        );
        assert!(
            t.contains("| 4 KiB rand | 16 x 128 | 1.50 | 6.0 | <= 1 us | no |"),
            "{t}"
        );
        assert!(
            t.contains("| 4 KiB rand | 1 x 32 | 0.50 | 0.5 | - | - |"),
            "{t}"
        );
        assert_eq!(t.lines().count(), 5, "dma rows left out: {t}");
    }

    #[test]
    fn the_integrity_cost_compares_auto_with_and_without_checksums() {
        let mut off_qd1 = test_row(INTEGRITY_OFF, true, 4096, 1, 1, 1e5);
        off_qd1.p50 = 7.5;
        let rows = vec![
            test_row("auto", false, 4096, 16, 128, 8.9e6),
            test_row(INTEGRITY_OFF, false, 4096, 16, 128, 1e7),
            test_row("auto", true, 4096, 16, 128, 8.0e6),
            test_row(INTEGRITY_OFF, true, 4096, 16, 128, 1e7),
            test_row("auto", true, 4096, 1, 1, 1e5),
            off_qd1,
        ];
        let t = integrity_cost(&rows);
        assert!(t.contains("| 4 KiB random write 16 x 128 | 8900000 IOPS | 10000000 IOPS | 0.89x | >= 0.9x | no |"), "{t}");
        assert!(t.contains("| 4 KiB random read 16 x 128 | 8000000 IOPS | 10000000 IOPS | 0.80x | >= 0.9x | no |"), "{t}");
        assert!(
            t.contains("| QD1 4 KiB read p50 | 8.0 us | 7.5 us | +0.5 us | at most +1 us | yes |"),
            "{t}"
        );
        assert!(t.contains("| 512 KiB sequential write 4 x 32 | 0 IOPS | 0 IOPS | not measured | >= 0.95x | no |"), "{t}");
    }
}
