//! `vramblk status --prometheus`: the status as Prometheus text-format
//! metrics (version 0.0.4), for node_exporter's textfile collector. Names
//! follow Prometheus' conventions: a `vramblk_` prefix, base units in the
//! name (`_bytes`, `_seconds`), `_total` on counters, one `device` label
//! ("ublkb0") per device series.

use crate::status::{DeviceStatus, Status};
use std::fmt::Write;

/// One metric family: its samples are written under one HELP/TYPE pair,
/// as the format requires.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    samples: Vec<(String, f64)>,
}

impl Family {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    fn add(&mut self, labels: &[(&str, &str)], value: f64) {
        self.samples.push((label_set(labels), value));
    }
}

/// `{a="x",b="y"}` with the values escaped as the format asks (backslash,
/// double quote, newline); empty without labels.
fn label_set(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let pairs: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", pairs.join(","))
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// The text for `status`.
pub fn render(status: &Status) -> String {
    let mut info = Family::new(
        "vramblk_device_info",
        "gauge",
        "A vramblk device: its store, backend, GPU and state as labels (value 1).",
    );
    let mut up = Family::new(
        "vramblk_device_up",
        "gauge",
        "1 while a server serves the device, 0 while it is recovering or dead.",
    );
    let mut size = Family::new("vramblk_device_size_bytes", "gauge", "The device's size.");
    let mut reads = Family::new(
        "vramblk_reads_total",
        "counter",
        "Reads completed, as the block layer counts them (/sys/block/ublkbN/stat).",
    );
    let mut writes = Family::new(
        "vramblk_writes_total",
        "counter",
        "Writes completed, as the block layer counts them.",
    );
    let mut read_bytes = Family::new(
        "vramblk_read_bytes_total",
        "counter",
        "Bytes read, as the block layer counts them.",
    );
    let mut written_bytes = Family::new(
        "vramblk_written_bytes_total",
        "counter",
        "Bytes written, as the block layer counts them.",
    );
    let mut in_flight = Family::new(
        "vramblk_requests_in_flight",
        "gauge",
        "Requests the block layer has in flight on the device.",
    );
    let mut errors = Family::new(
        "vramblk_io_errors_total",
        "counter",
        "Requests the server failed since it started (resets when a server takes over).",
    );
    let mut latency = Family::new(
        "vramblk_request_latency_seconds",
        "gauge",
        "Request latency in the server since it started, by quantile (0.5, 0.99).",
    );
    let mut restarts = Family::new(
        "vramblk_server_restarts_total",
        "counter",
        "Servers the device's supervisor started after one died.",
    );
    let mut uptime = Family::new(
        "vramblk_server_uptime_seconds",
        "gauge",
        "Seconds since the device's current server came up.",
    );
    let mut vram = Family::new(
        "vramblk_vram_bytes",
        "gauge",
        "VRAM the device holds now (cuda devices).",
    );
    let mut vram_data = Family::new(
        "vramblk_vram_data_bytes",
        "gauge",
        "VRAM that holds data (written and not discarded).",
    );
    let mut vram_full = Family::new(
        "vramblk_vram_full_bytes",
        "gauge",
        "VRAM the device holds when nothing is given back.",
    );
    let mut compressed_data = Family::new(
        "vramblk_compressed_data_bytes",
        "gauge",
        "A compressed device's data: every written page counted whole (zramctl's DATA).",
    );
    let mut compressed_compr = Family::new(
        "vramblk_compressed_compr_bytes",
        "gauge",
        "What that data takes compressed, same-filled pages none (zramctl's COMPR).",
    );
    let mut compressed_total = Family::new(
        "vramblk_compressed_total_bytes",
        "gauge",
        "VRAM the compressed data and its maps take: whole pool extents (zramctl's TOTAL).",
    );
    let mut compressed_pages = Family::new(
        "vramblk_compressed_pages",
        "gauge",
        "A compressed device's written pages by how they are kept: same (the word alone), \
         compressed (an LZ4 block), incompressible (whole).",
    );
    let mut integrity = Family::new(
        "vramblk_integrity_enabled",
        "gauge",
        "1 when every page in VRAM carries a checksum checked on read.",
    );
    let mut integrity_errors = Family::new(
        "vramblk_integrity_errors_total",
        "counter",
        "Reads failed (EIO) because a page's checksum did not match, since the server started.",
    );
    let mut swap_size = Family::new(
        "vramblk_swap_size_bytes",
        "gauge",
        "Swap space on the device (0 when swap is off).",
    );
    let mut swap_used = Family::new(
        "vramblk_swap_used_bytes",
        "gauge",
        "Swap space in use on the device.",
    );
    let mut gpu_free = Family::new(
        "vramblk_gpu_free_vram_bytes",
        "gauge",
        "Free VRAM of a GPU that serves a device (NVML).",
    );
    let mut service_up = Family::new(
        "vramblk_service_up",
        "gauge",
        "1 while vramblk.service runs.",
    );

    let mut gpus_seen = Vec::new();
    for d in &status.devices {
        let dev = d.path.trim_start_matches("/dev/").to_string();
        let l = [("device", dev.as_str())];
        info.add(&info_labels(d, &dev), 1.0);
        up.add(&l, flag(d.server_pid.is_some()));
        size.add(&l, d.size as f64);
        if let Some(b) = &d.block {
            reads.add(&l, b.reads as f64);
            writes.add(&l, b.writes as f64);
            read_bytes.add(&l, b.read_bytes as f64);
            written_bytes.add(&l, b.write_bytes as f64);
            in_flight.add(&l, b.in_flight as f64);
        }
        if let Some(s) = &d.server {
            let c = &s.counters;
            errors.add(&l, c.errors as f64);
            for (q, v) in [("0.5", c.p50_us), ("0.99", c.p99_us)] {
                if let Some(us) = v {
                    latency.add(&[("device", &dev), ("quantile", q)], us / 1e6);
                }
            }
        }
        if d.store.is_some() {
            restarts.add(&l, d.restarts as f64);
        }
        if let Some(s) = d.uptime_secs {
            uptime.add(&l, s as f64);
        }
        if let Some(v) = &d.vram {
            vram.add(&l, v.held as f64);
            vram_data.add(&l, v.used as f64);
            vram_full.add(&l, v.full as f64);
            if let Some(c) = &v.compressed {
                compressed_data.add(&l, c.data as f64);
                compressed_compr.add(&l, c.compr as f64);
                compressed_total.add(&l, c.total as f64);
                for (kind, n) in [
                    ("same", c.same_pages),
                    ("compressed", c.compressed_pages),
                    ("incompressible", c.incompressible_pages),
                ] {
                    compressed_pages.add(&[("device", &dev), ("kind", kind)], n as f64);
                }
            }
            integrity.add(&l, flag(v.integrity));
            integrity_errors.add(&l, v.integrity_errors as f64);
        }
        let (total, used) = d.swap.as_ref().map_or((0, 0), |s| (s.size, s.used));
        swap_size.add(&l, total as f64);
        swap_used.add(&l, used as f64);
        if let (Some(g), Some(free)) = (d.gpu, d.gpu_free_vram) {
            if !gpus_seen.contains(&g) {
                gpus_seen.push(g);
                gpu_free.add(&[("gpu", &g.to_string())], free as f64);
            }
        }
    }
    service_up.add(&[], flag(status.service.is_some()));

    let mut out = String::new();
    for f in [
        info,
        up,
        size,
        reads,
        writes,
        read_bytes,
        written_bytes,
        in_flight,
        errors,
        latency,
        restarts,
        uptime,
        vram,
        vram_data,
        vram_full,
        compressed_data,
        compressed_compr,
        compressed_total,
        compressed_pages,
        integrity,
        integrity_errors,
        swap_size,
        swap_used,
        gpu_free,
        service_up,
    ] {
        if f.samples.is_empty() {
            continue;
        }
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for (labels, v) in &f.samples {
            let _ = writeln!(out, "{}{labels} {v}", f.name);
        }
    }
    out
}

fn info_labels<'a>(d: &'a DeviceStatus, dev: &'a str) -> Vec<(&'static str, &'a str)> {
    let mut l = vec![("device", dev), ("state", d.state.as_str())];
    if let Some(store) = &d.store {
        l.push(("store", store.as_str()));
    }
    if let Some(name) = &d.gpu_name {
        l.push(("gpu_name", name.as_str()));
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{BlockStat, SwapStatus, VramUse};
    use std::collections::BTreeMap;

    fn device(id: u32) -> DeviceStatus {
        DeviceStatus {
            id,
            path: format!("/dev/ublkb{id}"),
            state: "live".into(),
            size: 1 << 30,
            store: Some("cuda \"GPU\" 0".into()),
            gpu: Some(0),
            gpu_name: Some("NVIDIA H200".into()),
            gpu_free_vram: Some(100 << 30),
            server_pid: Some(10),
            uptime_secs: Some(7),
            restarts: 2,
            swap: Some(SwapStatus {
                size: 1 << 30,
                used: 4096,
                priority: 1000,
            }),
            block: Some(BlockStat {
                reads: 3,
                read_bytes: 12288,
                writes: 5,
                write_bytes: 20480,
                in_flight: 1,
            }),
            vram: Some(VramUse {
                held: 1 << 29,
                used: 1 << 21,
                full: 1 << 30,
                integrity: true,
                integrity_errors: 4,
                compressed: None,
            }),
            ..DeviceStatus::default()
        }
    }

    /// A reader of the format as strict as Prometheus': every sample
    /// line is `name{labels} value` of a family announced just before by
    /// HELP and TYPE, counters end in `_total`, no family twice.
    fn parse(text: &str) -> BTreeMap<String, f64> {
        let mut samples = BTreeMap::new();
        let mut typed: Vec<String> = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["counter", "gauge"].contains(&kind), "{line}");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
                assert!(!typed.contains(&name.to_string()), "{name} twice");
                typed.push(name.to_string());
                current = name.to_string();
            } else if line.starts_with("# HELP ") {
                continue;
            } else {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let name = series.split('{').next().unwrap();
                assert_eq!(name, current, "{line}: not under its TYPE line");
                assert!(name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()));
                samples.insert(series.to_string(), value.parse::<f64>().unwrap());
            }
        }
        samples
    }

    #[test]
    fn every_counter_of_a_device_is_a_well_formed_sample() {
        let status = Status {
            devices: vec![device(0), device(3)],
            service: None,
        };
        let s = parse(&render(&status));
        assert_eq!(s["vramblk_reads_total{device=\"ublkb3\"}"], 3.0);
        assert_eq!(s["vramblk_written_bytes_total{device=\"ublkb0\"}"], 20480.0);
        assert_eq!(
            s["vramblk_vram_bytes{device=\"ublkb0\"}"],
            (1u64 << 29) as f64
        );
        assert_eq!(s["vramblk_integrity_errors_total{device=\"ublkb3\"}"], 4.0);
        assert_eq!(s["vramblk_swap_used_bytes{device=\"ublkb0\"}"], 4096.0);
        assert_eq!(s["vramblk_server_restarts_total{device=\"ublkb0\"}"], 2.0);
        assert_eq!(s["vramblk_device_up{device=\"ublkb0\"}"], 1.0);
        assert_eq!(s["vramblk_service_up"], 0.0);
        // One GPU serving two devices is one series.
        assert_eq!(
            s.keys()
                .filter(|k| k.starts_with("vramblk_gpu_free_vram_bytes"))
                .count(),
            1
        );
        // The store's name holds quotes: escaped, not cutting the label.
        assert!(s.contains_key(
            "vramblk_device_info{device=\"ublkb0\",state=\"live\",store=\"cuda \\\"GPU\\\" 0\",gpu_name=\"NVIDIA H200\"}"
        ));
    }

    #[test]
    fn a_compressed_device_shows_what_zramctl_shows() {
        let mut d = device(2);
        if let Some(v) = &mut d.vram {
            v.compressed = Some(vramblk_daemon::vram_control::CompressedUse {
                mode: "lz".into(),
                data: 30 << 20,
                compr: 9 << 20,
                total: 12 << 20,
                same_pages: 100,
                compressed_pages: 7000,
                incompressible_pages: 580,
            });
        }
        let s = parse(&render(&Status {
            devices: vec![d, device(0)],
            service: None,
        }));
        assert_eq!(
            s["vramblk_compressed_data_bytes{device=\"ublkb2\"}"],
            (30u64 << 20) as f64
        );
        assert_eq!(
            s["vramblk_compressed_compr_bytes{device=\"ublkb2\"}"],
            (9u64 << 20) as f64
        );
        assert_eq!(
            s["vramblk_compressed_total_bytes{device=\"ublkb2\"}"],
            (12u64 << 20) as f64
        );
        assert_eq!(
            s["vramblk_compressed_pages{device=\"ublkb2\",kind=\"incompressible\"}"],
            580.0
        );
        assert_eq!(
            s["vramblk_compressed_pages{device=\"ublkb2\",kind=\"same\"}"],
            100.0
        );
        // A plain device has no compressed series.
        assert!(!s
            .keys()
            .any(|k| k.starts_with("vramblk_compressed") && k.contains("ublkb0")));
    }

    #[test]
    fn a_host_without_devices_still_says_whether_the_service_runs() {
        let text = render(&Status {
            devices: vec![],
            service: None,
        });
        assert_eq!(parse(&text).len(), 1);
        assert!(text.contains("vramblk_service_up 0"));
    }

    #[test]
    fn a_recovering_device_reads_as_down() {
        let mut d = device(1);
        d.server_pid = None;
        d.server = None;
        d.state = "recovering".into();
        let s = parse(&render(&Status {
            devices: vec![d],
            service: None,
        }));
        assert_eq!(s["vramblk_device_up{device=\"ublkb1\"}"], 0.0);
    }
}
