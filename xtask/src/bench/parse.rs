//! Reading the benchmark guest's console: the records bench/jobs/run-jobs.sh
//! and bench/vm/bench-swap.sh print, turned into samples.

use serde_json::Value;
use std::collections::BTreeMap;

/// One job's result on one device in one round.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub device: String,
    pub job: String,
    pub round: u32,
    /// The job's headline figure, in the unit `jobs::spec` gives.
    pub value: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
}

/// Every sample found in the console lines, and how many records could
/// not be read (a kernel message inside a JSON block, a failed job).
pub fn samples(lines: &[String]) -> (Vec<Sample>, usize) {
    let mut out = Vec::new();
    let mut unreadable = 0;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if let Some(rest) = line.strip_prefix("BENCH-FIO-BEGIN ") {
            let mut json = String::new();
            i += 1;
            while i < lines.len() && lines[i].trim() != "BENCH-FIO-END" {
                json.push_str(&lines[i]);
                json.push('\n');
                i += 1;
            }
            match header(rest).and_then(|(d, j, r)| fio(d, j, r, &json)) {
                Some(s) => out.push(s),
                None => unreadable += 1,
            }
        } else if let Some(rest) = line.strip_prefix("BENCH-DD ") {
            match split_record(rest).and_then(|(head, body)| {
                let (d, j, r) = header(head)?;
                dd(d, j, r, body)
            }) {
                Some(s) => out.push(s),
                None => unreadable += 1,
            }
        } else if let Some(rest) = line.strip_prefix("BENCH-IOPING ") {
            match split_record(rest).and_then(|(head, body)| ioping(head, body)) {
                Some(s) => out.push(s),
                None => unreadable += 1,
            }
        }
        i += 1;
    }
    (out, unreadable)
}

fn split_record(rest: &str) -> Option<(&str, &str)> {
    let (head, body) = rest.split_once(" :: ")?;
    Some((head, body.trim()))
}

/// "LABEL JOB ROUND"
fn header(head: &str) -> Option<(&str, &str, u32)> {
    let mut w = head.split_whitespace();
    let (d, j, r) = (w.next()?, w.next()?, w.next()?.parse().ok()?);
    Some((d, j, r))
}

pub fn sample(device: &str, job: &str, round: u32, value: f64) -> Sample {
    Sample {
        device: device.to_string(),
        job: job.to_string(),
        round,
        value,
        p50_us: None,
        p99_us: None,
    }
}

/// "BYTES SECONDS" as run-jobs.sh timed dd; the figure is MB/s.
fn dd(device: &str, job: &str, round: u32, body: &str) -> Option<Sample> {
    let mut w = body.split_whitespace();
    let bytes: f64 = w.next()?.parse().ok()?;
    let secs: f64 = w.next()?.parse().ok()?;
    (secs > 0.0 && bytes > 0.0).then(|| sample(device, job, round, bytes / secs / 1e6))
}

/// ioping -B: count, time_ns, iops, bytes/s, min_ns, avg_ns, max_ns, mdev_ns, ...
/// The figure is the average latency in microseconds.
fn ioping(head: &str, body: &str) -> Option<Sample> {
    let mut w = head.split_whitespace();
    let (device, round) = (w.next()?, w.next()?.parse().ok()?);
    let f: Vec<f64> = body
        .split_whitespace()
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if f.len() < 8 || f[0] < 1.0 {
        return None;
    }
    let mut s = sample(device, "ioping", round, f[5] / 1e3);
    s.p99_us = Some(f[6] / 1e3);
    Some(s)
}

fn fio(device: &str, job: &str, round: u32, json: &str) -> Option<Sample> {
    let v: Value = serde_json::from_str(json).ok()?;
    let j = v.get("jobs")?.get(0)?;
    if j.get("error").and_then(Value::as_i64).unwrap_or(0) != 0 {
        return None;
    }
    let read = j.get("read")?;
    let write = j.get("write")?;
    let iops = |d: &Value| d.get("iops").and_then(Value::as_f64).unwrap_or(0.0);
    let mbps = |d: &Value| d.get("bw_bytes").and_then(Value::as_f64).unwrap_or(0.0) / 1e6;
    let pct = |d: &Value, p: &str| {
        d.get("clat_ns")
            .and_then(|c| c.get("percentile"))
            .and_then(|c| c.get(p))
            .and_then(Value::as_f64)
            .map(|ns| ns / 1e3)
    };
    // the direction the job measures: writes for write jobs, else reads
    let dir = if job.contains("write") { write } else { read };
    let value = match job {
        "seed-randrw" => iops(read) + iops(write),
        j if j.starts_with("seq") => mbps(dir),
        "randread-qd1" => dir.get("lat_ns")?.get("mean")?.as_f64()? / 1e3,
        _ => iops(dir),
    };
    if value <= 0.0 {
        return None;
    }
    let mut s = sample(device, job, round, value);
    s.p50_us = pct(dir, "50.000000");
    s.p99_us = pct(dir, "99.000000");
    Some(s)
}

/// One swap-pressure run: "BENCH-SWAP LABEL done k=v ..." or
/// `BENCH-SWAP LABEL <what failed>`.
#[derive(Debug, Clone, PartialEq)]
pub struct SwapRun {
    pub device: String,
    /// "done", "setup-failed", "swapon-failed", or "hung" when the boot
    /// timed out before a record came.
    pub outcome: String,
    pub fields: BTreeMap<String, f64>,
    pub oops: bool,
}

impl SwapRun {
    pub fn field(&self, k: &str) -> Option<f64> {
        self.fields.get(k).copied()
    }
}

pub fn swap_run(device: &str, lines: &[String]) -> SwapRun {
    let mut run = SwapRun {
        device: device.to_string(),
        outcome: "hung".into(),
        fields: BTreeMap::new(),
        oops: false,
    };
    for line in lines {
        let Some(rest) = line.trim().strip_prefix("BENCH-SWAP ") else {
            continue;
        };
        let mut w = rest.split_whitespace();
        let _label = w.next();
        match w.next() {
            Some("oops") => run.oops = true,
            Some(outcome) => {
                run.outcome = outcome.to_string();
                for kv in w {
                    if let Some((k, v)) = kv.split_once('=') {
                        if let Ok(v) = v.parse() {
                            run.fields.insert(k.to_string(), v);
                        }
                    }
                }
            }
            None => {}
        }
    }
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(String::from).collect()
    }

    #[test]
    fn reads_dd_ioping_and_fio_records() {
        let console = lines(
            r#"[   1.0] some kernel line
BENCH-DD vramblk dd-write 1 :: 2147483648 17.18
BENCH-IOPING nbd 1 :: 19 3801239 4998 20473345 147602 200065 300512 30214 20 19000000000
BENCH-FIO-BEGIN zram randread-qd1 2
{"jobs": [{"error": 0,
  "read": {"iops": 5000.5, "bw_bytes": 20480000, "lat_ns": {"mean": 190000.0},
           "clat_ns": {"percentile": {"50.000000": 180224, "99.000000": 700416}}},
  "write": {"iops": 0, "bw_bytes": 0}}]}
BENCH-FIO-END
BENCH-FIO-BEGIN zram seed-randrw 1
{"jobs": [{"error": 0, "read": {"iops": 100.0}, "write": {"iops": 50.0}}]}
BENCH-FIO-END"#,
        );
        let (s, bad) = samples(&console);
        assert_eq!(bad, 0);
        assert_eq!(s.len(), 4);
        assert_eq!(
            (s[0].device.as_str(), s[0].job.as_str()),
            ("vramblk", "dd-write")
        );
        assert!((s[0].value - 2147483648.0 / 17.18 / 1e6).abs() < 1e-6);
        assert_eq!(s[1].job, "ioping");
        assert!((s[1].value - 200.065).abs() < 1e-9);
        assert_eq!(s[2].round, 2);
        assert!((s[2].value - 190.0).abs() < 1e-9);
        assert_eq!(s[2].p99_us, Some(700.416));
        assert!((s[3].value - 150.0).abs() < 1e-9);
    }

    #[test]
    fn a_broken_record_is_counted_not_fatal() {
        let console = lines(
            "BENCH-FIO-BEGIN x seqread-1m 1\n{\"jobs\": [\n[ 9.1] ublk: oops\nBENCH-FIO-END\nBENCH-DD x dd-read 1 :: failed: dd: error reading",
        );
        let (s, bad) = samples(&console);
        assert!(s.is_empty());
        assert_eq!(bad, 2);
    }

    #[test]
    fn swap_records_and_a_hang() {
        let r = swap_run(
            "vramblk",
            &lines("BENCH-SWAP vramblk done rc=0 oom=0 secs=41.5 probe_p99_us=900"),
        );
        assert_eq!(r.outcome, "done");
        assert_eq!(r.field("secs"), Some(41.5));
        assert_eq!(r.field("rc"), Some(0.0));
        let hung = swap_run("nbd", &lines("INFO swap bench: nbd"));
        assert_eq!(hung.outcome, "hung");
    }
}
