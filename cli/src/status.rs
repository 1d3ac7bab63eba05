//! `vramblk status [--json]`: per device what the kernel, the swap table,
//! the block layer's counters, the device's server (its stats socket) and
//! the service know.

use crate::gpu::Gpus;
use crate::service::ServiceState;
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};
use vramblk_config::{format_size, human_size, Backend, DeviceRecord, RUN_DIR};
use vramblk_daemon::host::pid_alive;
use vramblk_daemon::stats::{self, StatsReply};
use vramblk_daemon::swap;
use vramblk_daemon::vram_control;
use vramblk_ublk_target::control::{self, bdev_path, device_ids};

#[derive(Debug, Serialize)]
pub struct Status {
    pub devices: Vec<DeviceStatus>,
    /// None when `vramblk service` is not running.
    pub service: Option<ServiceState>,
}

#[derive(Debug, Default, Serialize)]
pub struct DeviceStatus {
    pub id: u32,
    pub path: String,
    pub state: String,
    pub size: u64,
    pub backend: Option<Backend>,
    pub store: Option<String>,
    pub gpu: Option<u32>,
    pub gpu_name: Option<String>,
    pub gpu_free_vram: Option<u64>,
    /// Where its GPU sits (PCI address, NUMA node, the CPUs its processes
    /// were pinned to), from the record.
    pub gpu_place: Option<vramblk_config::GpuPlace>,
    /// The CPUs its server may run on now (/proc/PID/status).
    pub server_cpus: Option<String>,
    pub queues: Option<u16>,
    pub depth: Option<u16>,
    pub server_pid: Option<u32>,
    pub supervisor_pid: Option<u32>,
    /// The standby server waiting to take over (another child of the
    /// supervisor), and the VRAM NVML counts for it and for the server:
    /// each holds a CUDA context of its own (cuda devices).
    pub standby_pid: Option<u32>,
    pub server_vram: Option<u64>,
    pub standby_vram: Option<u64>,
    pub uptime_secs: Option<u64>,
    pub restarts: u32,
    /// Its server or supervisor runs a binary replaced on disk since it
    /// started (`vramblk upgrade` hands the device to the new one).
    pub binary_replaced: bool,
    /// Which configured device it is (`vramblk up` / the service): its place
    /// among the config's devices, an entry over several GPUs being one
    /// device per GPU.
    pub config_entry: Option<usize>,
    pub swap: Option<SwapStatus>,
    /// The block layer's counters (/sys/block/ublkbN/stat).
    pub block: Option<BlockStat>,
    /// The server's own counters; None when it does not answer.
    pub server: Option<StatsReply>,
    /// A cuda device's VRAM: held now, holding data, held when whole.
    pub vram: Option<VramUse>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct VramUse {
    pub held: u64,
    pub used: u64,
    pub full: u64,
    /// Page checksums on, and reads failed on a mismatch since the
    /// server started.
    pub integrity: bool,
    pub integrity_errors: u64,
    /// A compressed device's DATA, COMPR and TOTAL (as zramctl's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressed: Option<vramblk_daemon::vram_control::CompressedUse>,
}

#[derive(Debug, Serialize)]
pub struct SwapStatus {
    pub size: u64,
    pub used: u64,
    pub priority: i32,
}

#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct BlockStat {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub in_flight: u64,
}

/// Parses /sys/block/X/stat (sectors are 512 bytes there, whatever the
/// device's block size).
pub fn parse_block_stat(text: &str) -> Option<BlockStat> {
    let f: Vec<u64> = text
        .split_whitespace()
        .map(|w| w.parse().ok())
        .collect::<Option<_>>()?;
    Some(BlockStat {
        reads: *f.first()?,
        read_bytes: f.get(2)? * 512,
        writes: *f.get(4)?,
        write_bytes: f.get(6)? * 512,
        in_flight: *f.get(8)?,
    })
}

/// `vramblk gpus`.
pub fn gpus(json: bool, cuda: bool) -> Result<()> {
    let (gpus, source) = if cuda {
        (crate::gpu::from_cuda()?, crate::gpu::Source::Cuda)
    } else {
        crate::gpu::list_here()?
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&gpus)?);
        return Ok(());
    }
    if source == crate::gpu::Source::Cuda {
        eprintln!(
            "(from CUDA{}; each GPU held a context for a moment)",
            if cuda {
                ", as asked"
            } else {
                ": NVML is not there"
            }
        );
    }
    if gpus.is_empty() {
        println!("no NVIDIA GPU");
    }
    for g in gpus {
        let place = vramblk_daemon::locality::place_of(Path::new("/sys"), &g.pci_bus_id);
        println!(
            "{}: {}, {} free of {}, {}",
            g.index,
            g.name,
            human_size(g.free),
            human_size(g.total),
            place.describe()
        );
    }
    Ok(())
}

pub fn collect() -> Result<Status> {
    control::require_driver()?;
    let run_dir = Path::new(RUN_DIR);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut devices = Vec::new();
    for id in device_ids() {
        let path = bdev_path(id);
        let info = control::device_info(id).ok();
        let record = DeviceRecord::load(run_dir, id);
        let server_alive = record.as_ref().is_some_and(|r| pid_alive(r.pid));
        let holder_alive = record
            .as_ref()
            .and_then(|r| r.holder_pid)
            .is_some_and(pid_alive);
        let state = crate::list::device_state(info.as_ref(), record.as_ref(), server_alive);
        let name = path.trim_start_matches("/dev/");
        let mut d = DeviceStatus {
            id,
            state,
            queues: info.as_ref().map(|i| i.queues),
            depth: info.as_ref().map(|i| i.depth),
            swap: swap::find(&path).map(|s| SwapStatus {
                size: s.size_kib << 10,
                used: s.used_kib << 10,
                priority: s.priority,
            }),
            block: std::fs::read_to_string(format!("/sys/block/{name}/stat"))
                .ok()
                .and_then(|t| parse_block_stat(&t)),
            server: stats::query(&stats::socket_path(run_dir, id)),
            vram: vram_control::request(run_dir, id, vram_control::Command::Usage)
                .ok()
                .map(|u| VramUse {
                    held: u.held,
                    used: u.used,
                    full: u.full,
                    integrity: u.integrity,
                    integrity_errors: u.integrity_errors,
                    compressed: u.compressed,
                }),
            path,
            ..DeviceStatus::default()
        };
        if let Some(r) = record {
            d.size = r.size;
            d.backend = Some(r.backend);
            d.store = Some(r.store);
            d.gpu = r.gpu;
            d.gpu_place = r.place;
            d.server_pid = Some(r.pid).filter(|_| server_alive);
            d.server_cpus = d.server_pid.and_then(allowed_cpus);
            d.supervisor_pid = r.holder_pid.filter(|_| holder_alive);
            d.standby_pid = d.supervisor_pid.and_then(|h| {
                vramblk_daemon::host::children_of(h)
                    .into_iter()
                    .find(|&c| Some(c) != d.server_pid)
            });
            d.binary_replaced = [d.server_pid, d.supervisor_pid]
                .into_iter()
                .flatten()
                .any(vramblk_daemon::upgrade::runs_replaced_binary);
            d.uptime_secs = r.live_since.map(|t| now.saturating_sub(t));
            d.restarts = r.restarts;
            d.config_entry = r.origin;
        }
        devices.push(d);
    }
    // Each GPU once, however many devices it serves; nothing without NVML.
    let used: BTreeSet<u32> = devices.iter().filter_map(|d| d.gpu).collect();
    let gpus = (!used.is_empty()).then(Gpus::open).and_then(Result::ok);
    for (g, info) in used
        .into_iter()
        .filter_map(|g| Some((g, gpus.as_ref()?.info(g).ok()?)))
    {
        let by_pid = gpus
            .as_ref()
            .and_then(|n| n.process_vram(g).ok())
            .unwrap_or_default();
        let vram_of = |pid: Option<u32>| {
            let pid = pid?;
            by_pid.iter().find(|(p, _)| *p == pid).and_then(|(_, b)| *b)
        };
        for d in devices.iter_mut().filter(|d| d.gpu == Some(g)) {
            d.server_vram = vram_of(d.server_pid);
            d.standby_vram = vram_of(d.standby_pid);
            d.gpu_name = Some(info.name.clone());
            d.gpu_free_vram = Some(info.free);
        }
    }
    let service = ServiceState::load().filter(|s| pid_alive(s.pid));
    Ok(Status { devices, service })
}

/// The CPUs process `pid` may run on ("0-15").
fn allowed_cpus(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|l| l.trim().to_string())
}

/// `vramblk status` as text.
pub fn print_text(s: &Status) {
    if s.devices.is_empty() {
        println!("no ublk devices");
    }
    for d in &s.devices {
        print_device(d);
    }
    match &s.service {
        Some(svc) => {
            println!("service (pid {}): power {}", svc.pid, svc.power);
            for (g, p) in &svc.pressure {
                println!("  GPU {g} VRAM pressure: {p}");
            }
            if !svc.held_down.is_empty() {
                println!(
                    "  configured devices held down now: {:?} (in the config's order, one per \
                     GPU of an entry over several)",
                    svc.held_down
                );
            }
            if !svc.holding.is_empty() {
                let paths: Vec<String> = svc.holding.iter().map(|&i| bdev_path(i)).collect();
                println!(
                    "  holds the memory of {} too (a supervisor's death loses nothing)",
                    paths.join(", ")
                );
            }
        }
        None => println!("service: not running"),
    }
}

/// Share of the VRAM held that a compressed device may fill before
/// `status` warns: writes need the keeper to take more beyond it.
const FULL_WARNING: f64 = 0.9;

/// A compressed device's line, as zramctl's columns, and a warning when
/// its VRAM is nearly full.
fn print_compressed(c: &vramblk_daemon::vram_control::CompressedUse, held: u64) {
    println!(
        "  compress {}: DATA {}, COMPR {}, TOTAL {} (ratio {:.2}x); {} same-filled, {} compressed, \
         {} incompressible pages",
        c.mode,
        human_size(c.data),
        human_size(c.compr),
        human_size(c.total),
        c.ratio(),
        c.same_pages,
        c.compressed_pages,
        c.incompressible_pages
    );
    if held > 0 && c.total as f64 >= FULL_WARNING * held as f64 {
        println!(
            "  warning: {:.0}% of the VRAM held is in use; writes need more (taken back while \
             the GPU has it free), else they fail with ENOSPC and swap keeps those pages in RAM",
            100.0 * c.total as f64 / held as f64
        );
    }
}

fn print_device(d: &DeviceStatus) {
    println!("{} ({}): {}", d.path, format_size(d.size), d.state);
    if let Some(store) = &d.store {
        let gpu = match (&d.gpu_name, d.gpu_free_vram) {
            (Some(n), Some(f)) => format!(", {n}, {} VRAM free", human_size(f)),
            _ => String::new(),
        };
        println!("  store: {store}{gpu}");
        if let (Some(g), Some(place)) = (d.gpu, &d.gpu_place) {
            println!(
                "  GPU {g}: {}; server on CPUs {}",
                place.describe(),
                d.server_cpus.as_deref().unwrap_or("?")
            );
        }
        if let Some(v) = &d.vram {
            println!(
                "  VRAM: holds {} ({} of it data; {} when whole)",
                human_size(v.held),
                human_size(v.used),
                human_size(v.full)
            );
            if let Some(c) = &v.compressed {
                print_compressed(c, v.held);
            }
            if v.integrity {
                println!(
                    "  integrity: page checksums on, {} read(s) failed on a mismatch since the server started",
                    v.integrity_errors
                );
            } else {
                println!("  integrity: off (no page checksums)");
            }
        }
    } else {
        println!("  store: (not a vramblk device)");
    }
    if let (Some(q), Some(depth)) = (d.queues, d.depth) {
        println!("  queues: {q} x depth {depth}");
    }
    match (d.server_pid, d.supervisor_pid) {
        (Some(p), Some(h)) => println!(
            "  server pid {p}, supervisor pid {h}, up {}, {} restart(s)",
            d.uptime_secs
                .map(|s| format!("{s} s"))
                .unwrap_or_else(|| "?".into()),
            d.restarts
        ),
        (None, Some(h)) => println!("  no server (supervisor {h} is recovering it)"),
        _ => {}
    }
    if d.binary_replaced {
        println!(
            "  runs a vramblk binary replaced on disk since it started: `vramblk upgrade` hands it \
             to the new one, swap left on"
        );
    }
    if let Some(s) = d.standby_pid {
        let vram = |b: Option<u64>| b.map(|b| format!(", {} of VRAM", human_size(b)));
        println!(
            "  standby server pid {s} ready to take over{}{}",
            vram(d.standby_vram)
                .map(|v| format!(" (its CUDA context{v})"))
                .unwrap_or_default(),
            vram(d.server_vram)
                .map(|v| format!("; the server's context{v}"))
                .unwrap_or_default()
        );
    }
    match &d.swap {
        Some(s) => println!(
            "  swap: {} of {} used, priority {}",
            human_size(s.used),
            human_size(s.size),
            s.priority
        ),
        None => println!("  swap: off"),
    }
    if let Some(b) = &d.block {
        println!(
            "  block layer: {} reads ({}), {} writes ({}), {} in flight",
            b.reads,
            human_size(b.read_bytes),
            b.writes,
            human_size(b.write_bytes),
            b.in_flight
        );
    }
    if let Some(r) = &d.server {
        let c = &r.counters;
        let lat = match (c.p50_us, c.p99_us) {
            (Some(a), Some(b)) => format!("latency p50 {a:.0} us, p99 {b:.0} us"),
            _ => "no requests yet".into(),
        };
        println!(
            "  server: {} reads, {} writes, {} errors since it started; {lat}",
            c.reads, c.writes, c.errors
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sys_block_stat() {
        let t = "    1520        0    12160      370     3000        0    24000     1200        2      900     1570        0        0        0        0        0        0\n";
        assert_eq!(
            parse_block_stat(t),
            Some(BlockStat {
                reads: 1520,
                read_bytes: 12160 * 512,
                writes: 3000,
                write_bytes: 24000 * 512,
                in_flight: 2
            })
        );
        assert_eq!(parse_block_stat("1 2"), None);
        assert_eq!(parse_block_stat("x"), None);
    }
}
