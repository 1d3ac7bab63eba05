//! Turning benchmark samples into docs/benchmarks.md's VM section and its
//! picture: a table per job with every round, the mean and the ratio to
//! NBD measured in the same boot; the targets; the swap-pressure runs.

use super::parse::{Sample, SwapRun};
use anyhow::{Context, Result};
use std::fmt::Write;
use std::path::Path;

pub struct Job {
    pub name: &'static str,
    pub title: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
}

pub const JOBS: &[Job] = &[
    Job {
        name: "dd-write",
        title: "dd write, 4 MiB blocks from /dev/zero, O_DIRECT, 2 GiB (nbd-vram's README)",
        unit: "MB/s",
        higher_is_better: true,
    },
    Job {
        name: "dd-read",
        title: "dd read, 4 MiB blocks, O_DIRECT, 2 GiB (nbd-vram's README)",
        unit: "MB/s",
        higher_is_better: true,
    },
    Job {
        name: "ioping",
        title: "ioping -c 20 -D (nbd-vram's README); p99 column: the slowest request",
        unit: "us mean",
        higher_is_better: false,
    },
    Job {
        name: "seed-randrw",
        title: "fio randrw 4 KiB, iodepth 32, 512 MiB, 20 s (nbd-vram's README)",
        unit: "IOPS read+write",
        higher_is_better: true,
    },
    Job {
        name: "par16x8",
        title: "fio randread 4 KiB, 16 jobs x iodepth 8 (nbd-vram's parallel run)",
        unit: "IOPS",
        higher_is_better: true,
    },
    Job {
        name: "randread-qd1",
        title: "4 KiB random read, iodepth 1",
        unit: "us mean latency",
        higher_is_better: false,
    },
    Job {
        name: "randread-qd128",
        title: "4 KiB random read, iodepth 128",
        unit: "IOPS",
        higher_is_better: true,
    },
    Job {
        name: "randwrite-qd128",
        title: "4 KiB random write, iodepth 128",
        unit: "IOPS",
        higher_is_better: true,
    },
    Job {
        name: "seqwrite-1m",
        title: "1 MiB sequential write, iodepth 8",
        unit: "MB/s",
        higher_is_better: true,
    },
    Job {
        name: "seqread-1m",
        title: "1 MiB sequential read, iodepth 8",
        unit: "MB/s",
        higher_is_better: true,
    },
];

/// (label in the records, name in the tables)
pub const DEVICES: &[(&str, &str)] = &[
    ("vramblk", "vramblk (host backend)"),
    ("rublk-null", "rublk null (moves no data)"),
    ("rublk-loop", "rublk loop (file in tmpfs)"),
    ("nbd", "NBD (nbdkit memory, Unix socket)"),
    ("zram", "zram (lz4)"),
];

pub const BASELINE: &str = "nbd";

/// `device`'s samples of `job`, by round.
pub fn of<'a>(samples: &'a [Sample], device: &str, job: &str) -> Vec<&'a Sample> {
    let mut v: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.device == device && s.job == job)
        .collect();
    v.sort_by_key(|s| s.round);
    v
}

pub fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = xs.collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

pub fn mean_of(samples: &[Sample], device: &str, job: &str) -> Option<f64> {
    mean(of(samples, device, job).iter().map(|s| s.value))
}

/// The mean over the rounds both ran of `a`'s figure divided by `b`'s.
/// Ratios are taken within a round: every device runs faster in later
/// rounds (TCG's translation cache warming up), so a device measured only
/// in round 1 must be compared with round 1's baseline.
pub fn paired(samples: &[Sample], a: &str, b: &str, job: &str) -> Option<f64> {
    let base = of(samples, b, job);
    mean(of(samples, a, job).iter().filter_map(|x| {
        base.iter()
            .find(|y| y.round == x.round && y.value > 0.0)
            .map(|y| x.value / y.value)
    }))
}

/// How many times better than NBD (above 1 is better, whatever the unit).
pub fn vs_baseline(samples: &[Sample], device: &str, job: &Job) -> Option<f64> {
    if job.higher_is_better {
        paired(samples, device, BASELINE, job.name)
    } else {
        paired(samples, BASELINE, device, job.name)
    }
}

fn fmt_num(x: f64) -> String {
    if x >= 100.0 {
        let mut s = format!("{:.0}", x);
        let mut i = s.len() as isize - 3;
        while i > 0 {
            s.insert(i as usize, ',');
            i -= 3;
        }
        s
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

pub fn job_tables(samples: &[Sample], rounds: u32) -> String {
    let mut md = String::new();
    for job in JOBS {
        let _ = writeln!(md, "#### {} ({})\n", job.title, job.unit);
        let mut head = String::from("| device |");
        let mut rule = String::from("| --- |");
        for r in 1..=rounds {
            let _ = write!(head, " round {r} |");
            rule.push_str(" --- |");
        }
        head.push_str(" mean | p50 / p99 us | vs NBD |");
        rule.push_str(" --- | --- | --- |");
        let _ = writeln!(md, "{head}\n{rule}");
        for (label, name) in DEVICES {
            let got = of(samples, label, job.name);
            if got.is_empty() {
                continue;
            }
            let mut row = format!("| {name} |");
            for r in 1..=rounds {
                match got.iter().find(|s| s.round == r) {
                    Some(s) => {
                        let _ = write!(row, " {} |", fmt_num(s.value));
                    }
                    None => row.push_str(" - |"),
                }
            }
            let m = mean(got.iter().map(|s| s.value)).unwrap_or(0.0);
            let p50 = mean(got.iter().filter_map(|s| s.p50_us));
            let p99 = mean(got.iter().filter_map(|s| s.p99_us));
            let lat = match (p50, p99) {
                (Some(a), Some(b)) => format!("{} / {}", fmt_num(a), fmt_num(b)),
                (None, Some(b)) => format!("- / {}", fmt_num(b)),
                _ => "-".into(),
            };
            let ratio = vs_baseline(samples, label, job)
                .map(|r| format!("{r:.2}x"))
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(md, "{row} {} | {lat} | {ratio} |", fmt_num(m));
        }
        md.push('\n');
    }
    md
}

/// The targets, each with the figure measured and whether it is met.
pub fn targets(samples: &[Sample], swaps: &[SwapRun]) -> String {
    let mut md = String::from("| target | measured | met |\n| --- | --- | --- |\n");
    let mut row = |what: &str, got: Option<f64>, want: f64, at_least: bool, unit: &str| {
        let (text, met) = match got {
            Some(g) => (
                format!("{g:.2}{unit}"),
                if (at_least && g >= want) || (!at_least && g <= want) {
                    "yes"
                } else {
                    "no"
                },
            ),
            None => ("not measured".into(), "no"),
        };
        let _ = writeln!(md, "| {what} | {text} | {met} |");
    };
    let ratio =
        |a: &str, b: &str, job: &str| Some(mean_of(samples, a, job)? / mean_of(samples, b, job)?);
    row(
        "vramblk >= 0.85x rublk null, 4 KiB random qd32 IOPS (seed randrw)",
        ratio("vramblk", "rublk-null", "seed-randrw"),
        0.85,
        true,
        "x",
    );
    row(
        "vramblk qd1 latency within 1.5x of rublk null's (4 KiB randread, mean)",
        ratio("vramblk", "rublk-null", "randread-qd1"),
        1.5,
        false,
        "x",
    );
    row(
        "vramblk >= 3.5x NBD, 4 KiB random qd32 IOPS (seed randrw)",
        ratio("vramblk", BASELINE, "seed-randrw"),
        3.5,
        true,
        "x",
    );
    for (job, what) in [
        ("seqwrite-1m", "1 MiB sequential write qd8"),
        ("seqread-1m", "1 MiB sequential read qd8"),
        ("dd-write", "dd 4 MiB write"),
        ("dd-read", "dd 4 MiB read"),
    ] {
        row(
            &format!("vramblk >= 8x NBD sequential: {what}"),
            ratio("vramblk", BASELINE, job),
            8.0,
            true,
            "x",
        );
    }
    let outcome = |d: &str| swaps.iter().find(|s| s.device == d).map(swap_outcome);
    let _ = writeln!(
        md,
        "| swap pressure: vramblk completes, no OOM kill, no hang | {} | {} |",
        outcome("vramblk").unwrap_or_else(|| "not run".into()),
        if swaps.iter().any(|s| s.device == "vramblk" && swap_ok(s)) {
            "yes"
        } else {
            "no"
        }
    );
    md
}

fn swap_ok(s: &SwapRun) -> bool {
    s.outcome == "done" && s.field("rc") == Some(0.0) && s.field("oom") == Some(0.0) && !s.oops
}

pub fn swap_outcome(s: &SwapRun) -> String {
    match s.outcome.as_str() {
        "done" if swap_ok(s) => "completed, every byte intact".into(),
        "done" if s.field("oom") == Some(1.0) => "OOM kill".into(),
        "done" => format!("failed (memcheck exit {})", s.field("rc").unwrap_or(-1.0)),
        "hung" => "hung (no swap progress for 20 s, or the guest fell silent)".into(),
        other => other.replace('-', " "),
    }
}

pub fn swap_table(swaps: &[SwapRun]) -> String {
    let mut md = String::from(
        "| device | outcome | working set | run time | swapped out | swapped in | PSI memory full | probe p50 / p99 / max |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for s in swaps {
        let name = DEVICES
            .iter()
            .find(|(l, _)| *l == s.device)
            .map_or(s.device.as_str(), |(_, n)| n);
        let f = |k: &str| s.field(k);
        let secs = f("secs");
        let mib_s = |pages: Option<f64>| match (pages, secs) {
            (Some(p), Some(t)) if t > 0.0 => {
                format!("{:.0} MiB ({:.1} MiB/s)", p / 256.0, p / 256.0 / t)
            }
            _ => "-".into(),
        };
        let psi = match (f("psi_full_us"), secs) {
            (Some(us), Some(t)) if t > 0.0 => {
                format!("{:.1} s ({:.0}% of the run)", us / 1e6, us / 1e4 / t)
            }
            _ => "-".into(),
        };
        let probe = match (f("probe_p50_us"), f("probe_p99_us"), f("probe_max_us")) {
            (Some(a), Some(b), Some(c)) => {
                format!("{:.1} / {:.1} / {:.1} ms", a / 1e3, b / 1e3, c / 1e3)
            }
            _ => "-".into(),
        };
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} | {psi} | {probe} |",
            swap_outcome(s),
            f("fill_mib").map_or("-".into(), |m| format!("{m:.0} MiB x2 passes")),
            secs.map_or("-".into(), |t| format!("{t:.1} s")),
            mib_s(f("pswpout")),
            mib_s(f("pswpin")),
        );
    }
    md
}

/// A grouped bar chart of every device's ratio to NBD, job by job.
pub fn draw_ratios(samples: &[Sample], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let jobs: Vec<&Job> = JOBS.iter().collect();
    let devices: Vec<(&str, &str)> = DEVICES.to_vec();
    let mut top: f64 = 1.0;
    for job in &jobs {
        for (d, _) in &devices {
            if let Some(r) = vs_baseline(samples, d, job) {
                top = top.max(r);
            }
        }
    }
    let root = SVGBackend::new(path, (1200, 560)).into_drawing_area();
    root.fill(&WHITE).context("drawing the chart background")?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "speed-up over NBD in the same VM boot (higher is better; emulated, TCG)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..jobs.len() as f64, 0f64..top * 1.4)
        .context("laying out the chart")?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(jobs.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 && i < JOBS.len() {
                JOBS[i].name.to_string()
            } else {
                String::new()
            }
        })
        .y_desc("x NBD")
        .draw()
        .context("drawing the axes")?;
    let palette = [
        RGBColor(0x1b, 0x9e, 0x77),
        RGBColor(0x75, 0x70, 0xb3),
        RGBColor(0x66, 0xa6, 0x1e),
        RGBColor(0x99, 0x99, 0x99),
        RGBColor(0xd9, 0x5f, 0x02),
    ];
    let width = 0.8 / devices.len() as f64;
    for (k, (label, name)) in devices.iter().enumerate() {
        let color = palette[k % palette.len()];
        let bars: Vec<Rectangle<(f64, f64)>> = jobs
            .iter()
            .enumerate()
            .filter_map(|(i, job)| {
                let r = vs_baseline(samples, label, job)?;
                let x0 = i as f64 + 0.1 + width * k as f64;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.9, r)],
                    color.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)
            .context("drawing the bars")?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(0.0, 1.0), (jobs.len() as f64, 1.0)],
            BLACK.stroke_width(1),
        )))
        .context("drawing the NBD line")?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .context("drawing the legend")?;
    root.present().context("writing the SVG")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(device: &str, job: &str, round: u32, value: f64) -> Sample {
        Sample {
            device: device.into(),
            job: job.into(),
            round,
            value,
            p50_us: Some(10.0),
            p99_us: Some(20.0),
        }
    }

    #[test]
    fn ratios_are_better_above_one_for_latency_too() {
        let v = vec![
            s("nbd", "seed-randrw", 1, 100.0),
            s("nbd", "seed-randrw", 2, 100.0),
            s("vramblk", "seed-randrw", 1, 300.0),
            s("vramblk", "seed-randrw", 2, 500.0),
            s("zram", "seed-randrw", 1, 200.0),
            s("nbd", "randread-qd1", 1, 300.0),
            s("vramblk", "randread-qd1", 1, 100.0),
        ];
        let job = |n| JOBS.iter().find(|j| j.name == n).unwrap();
        assert_eq!(vs_baseline(&v, "vramblk", job("seed-randrw")), Some(4.0));
        assert_eq!(vs_baseline(&v, "vramblk", job("randread-qd1")), Some(3.0));
        // measured in round 1 only: compared with round 1's NBD alone
        assert_eq!(vs_baseline(&v, "zram", job("seed-randrw")), Some(2.0));
        let md = job_tables(&v, 2);
        assert!(
            md.contains("| vramblk (host backend) | 300 | 500 | 400 | 10.0 / 20.0 | 4.00x |"),
            "{md}"
        );
        let t = targets(&v, &[]);
        assert!(
            t.contains(
                "| vramblk >= 3.5x NBD, 4 KiB random qd32 IOPS (seed randrw) | 4.00x | yes |"
            ),
            "{t}"
        );
    }

    #[test]
    fn draws_the_chart() {
        let v = vec![
            s("nbd", "dd-write", 1, 100.0),
            s("vramblk", "dd-write", 1, 250.0),
        ];
        let path = std::env::temp_dir().join(format!("vramblk-chart-{}.svg", std::process::id()));
        draw_ratios(&v, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert!(svg.contains("<svg") && svg.contains("dd-write"));
    }
}
