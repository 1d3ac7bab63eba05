//! The ceilings over the same GPU in the same run (issue 19), with no
//! store logic at all: the copy kernel alone (cuda-store's `ceiling`) for
//! the 4 KiB random shapes, and raw pinned copies for the rest. One 4 KiB copy from pinned memory at queue depth 1
//! is the floor a lone request cannot beat; 512 KiB copies kept in flight
//! on 4 streams (the sequential shape's 4 queues) give the copy engines'
//! pinned bandwidth. The copy kernel (rounds of 4 requests or more) moves
//! data on the SMs and can beat that bandwidth: the sequential ratio may
//! exceed 1.

use anyhow::{Context, Result};
use cudarc::driver::result::{self, stream};
use std::time::Instant;
use vramblk_cuda_store::CudaStore;

use crate::table::{yes_no, Row};

const DEVICE_BYTES: usize = 1 << 30;
const SEQ_BS: usize = 512 << 10;
const SEQ_STREAMS: usize = 4;
/// Copies each stream has queued before it waits for them (the sequential
/// shape's depth).
const SEQ_DEPTH: usize = 32;

/// The 4 KiB shapes whose ceiling is the copy kernel itself: (queues,
/// depth).
const GATHER_SHAPES: [(u16, usize); 2] = [(16, 128), (1, 32)];

/// What raw pinned copies and the raw copy kernel do with no store in the
/// way.
pub struct Ceiling {
    /// IOPS of the copy kernel alone: (queues, depth, write, IOPS).
    pub gather: Vec<(u16, usize, bool, f64)>,
    /// p50 of one 4 KiB pinned copy and its wait, us.
    pub qd1_write_p50: f64,
    pub qd1_read_p50: f64,
    /// GB/s of 512 KiB pinned copies on 4 streams, 32 in flight each.
    pub seq_write_gbps: f64,
    pub seq_read_gbps: f64,
}

/// Device memory, pinned host memory and streams, freed on drop.
struct Buffers {
    dev: cudarc::driver::sys::CUdeviceptr,
    host: *mut std::ffi::c_void,
    host_len: usize,
    streams: Vec<cudarc::driver::sys::CUstream>,
}

impl Buffers {
    fn new(store: &CudaStore) -> Result<Buffers> {
        store
            .make_current()
            .context("making the store's context current")?;
        let host_len = SEQ_STREAMS * SEQ_DEPTH * SEQ_BS;
        // SAFETY: plain allocations in the current context, freed in Drop.
        let dev = unsafe { result::malloc_sync(DEVICE_BYTES) }.context("cuMemAlloc")?;
        let mut b = Buffers {
            dev,
            host: std::ptr::null_mut(),
            host_len,
            streams: Vec::new(),
        };
        // SAFETY: as above; 0 = plain page-locked memory.
        b.host = unsafe { result::malloc_host(host_len, 0) }.context("cuMemHostAlloc")?;
        for _ in 0..SEQ_STREAMS {
            b.streams
                .push(stream::create(stream::StreamKind::NonBlocking).context("cuStreamCreate")?);
        }
        Ok(b)
    }

    /// The pinned buffer as bytes.
    fn host(&mut self) -> &mut [u8] {
        // SAFETY: host_len bytes of pinned memory this struct owns.
        unsafe { std::slice::from_raw_parts_mut(self.host.cast(), self.host_len) }
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: each was created in new() and is not used after this.
        unsafe {
            for s in self.streams.drain(..) {
                let _ = stream::synchronize(s);
                let _ = stream::destroy(s);
            }
            if !self.host.is_null() {
                let _ = result::free_host(self.host);
            }
            let _ = result::free_sync(self.dev);
        }
    }
}

/// Copies `bs` bytes between the host buffer at `h` and the device at
/// `d` on `s` (host to device for a write).
///
/// SAFETY: `h..h+bs` inside the buffer, `d..d+bs` inside the allocation.
unsafe fn copy(
    b: &mut Buffers,
    s: usize,
    write: bool,
    h: usize,
    d: usize,
    bs: usize,
) -> Result<()> {
    let stream = b.streams[s];
    let dev = b.dev + d as u64;
    let host = &mut b.host()[h..h + bs];
    if write {
        result::memcpy_htod_async(dev, host, stream)?;
    } else {
        result::memcpy_dtoh_async(host, dev, stream)?;
    }
    Ok(())
}

fn qd1_p50(b: &mut Buffers, write: bool, secs: f64) -> Result<f64> {
    let mut lat = Vec::new();
    let mut off = 0usize;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        off = (off + 7919 * 4096) % DEVICE_BYTES;
        let t = Instant::now();
        // SAFETY: 4 KiB at the buffer's start; off + 4 KiB inside the device
        // allocation (a multiple of 4 KiB below its size).
        unsafe {
            copy(b, 0, write, 0, off, 4096)?;
            stream::synchronize(b.streams[0])?;
        }
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok(lat.get(lat.len() / 2).copied().unwrap_or(0.0))
}

fn seq_gbps(b: &mut Buffers, write: bool, secs: f64) -> Result<f64> {
    let mut bytes = 0usize;
    let mut pos = 0usize;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        for s in 0..SEQ_STREAMS {
            for k in 0..SEQ_DEPTH {
                let h = (s * SEQ_DEPTH + k) * SEQ_BS;
                // SAFETY: h + SEQ_BS <= host_len by construction; pos wraps
                // within the device allocation in SEQ_BS steps.
                unsafe { copy(b, s, write, h, pos, SEQ_BS)? };
                pos = (pos + SEQ_BS) % DEVICE_BYTES;
                bytes += SEQ_BS;
            }
        }
        for &s in &b.streams {
            // SAFETY: a stream of ours.
            unsafe { stream::synchronize(s)? };
        }
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64() / 1e9)
}

/// Measures the ceiling on `store`'s GPU, `secs` per figure.
pub fn measure(store: &CudaStore, secs: f64) -> Result<Ceiling> {
    let mut gather = Vec::new();
    for (q, d) in GATHER_SHAPES {
        for write in [true, false] {
            let iops = vramblk_cuda_store::ceiling::raw_gather_iops(store, q, d, write, secs)?;
            gather.push((q, d, write, iops));
        }
    }
    let mut b = Buffers::new(store)?;
    Ok(Ceiling {
        gather,
        qd1_write_p50: qd1_p50(&mut b, true, secs)?,
        qd1_read_p50: qd1_p50(&mut b, false, secs)?,
        seq_write_gbps: seq_gbps(&mut b, true, secs)?,
        seq_read_gbps: seq_gbps(&mut b, false, secs)?,
    })
}

/// The default mode's QD1 and 512 KiB sequential rows against the ceiling,
/// with issue 19's targets (QD1 p50 <= 1.05x the floor, sequential >=
/// 0.95x the pinned bandwidth).
pub fn table(rows: &[Row], mode: &str, c: &Ceiling) -> String {
    let mut t = String::from(
        "| shape | measured | ceiling, same run | ratio | target | met |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows.iter().filter(|r| r.mode == mode) {
        let dir = if r.read { "read" } else { "write" };
        let gather = c
            .gather
            .iter()
            .find(|&&(q, d, w, _)| q == r.queues && d == r.depth && w != r.read);
        if let (Some(&(_, _, _, cap)), true) = (gather, r.bs == 4096 && r.name.contains("rand")) {
            let ratio = r.iops / cap;
            t += &format!(
                "| 4 KiB random {dir} {} x {} | {:.2} M IOPS | {:.2} M IOPS (the copy kernel alone) | {ratio:.2}x | >= 0.85x | {} |\n",
                r.queues,
                r.depth,
                r.iops / 1e6,
                cap / 1e6,
                yes_no(ratio >= 0.85)
            );
        } else if r.bs == 4096 && r.queues == 1 && r.depth == 1 {
            let floor = if r.read {
                c.qd1_read_p50
            } else {
                c.qd1_write_p50
            };
            let ratio = r.p50 / floor;
            t += &format!(
                "| QD1 4 KiB {dir} p50 | {:.1} us | {floor:.1} us | {ratio:.2}x | <= 1.05x | {} |\n",
                r.p50,
                yes_no(ratio <= 1.05)
            );
        } else if r.bs == SEQ_BS as u64 {
            let cap = if r.read {
                c.seq_read_gbps
            } else {
                c.seq_write_gbps
            };
            let ratio = r.gbps / cap;
            t += &format!(
                "| 512 KiB sequential {dir} {} x {} | {:.1} GB/s | {cap:.1} GB/s | {ratio:.2}x | >= 0.95x | {} |\n",
                r.queues,
                r.depth,
                r.gbps,
                yes_no(ratio >= 0.95)
            );
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::test_row;

    #[test]
    fn each_shape_meets_its_own_ceiling() {
        let c = Ceiling {
            gather: vec![
                (16, 128, true, 10e6),
                (16, 128, false, 10e6),
                (1, 32, false, 2e6),
            ],
            qd1_write_p50: 7.0,
            qd1_read_p50: 7.0,
            seq_write_gbps: 40.0,
            seq_read_gbps: 40.0,
        };
        let mut qd1 = test_row("auto", true, 4096, 1, 1, 1e5);
        qd1.p50 = 7.7;
        let rows = vec![
            test_row("auto", false, 4096, 16, 128, 9e6),
            test_row("auto", true, 4096, 16, 128, 8e6),
            test_row("auto", true, 4096, 1, 32, 1.8e6),
            qd1,
            test_row("auto", true, 512 << 10, 4, 32, 90_000.0),
        ];
        let t = table(&rows, "auto", &c);
        assert!(t.contains("| 4 KiB random write 16 x 128 | 9.00 M IOPS | 10.00 M IOPS (the copy kernel alone) | 0.90x | >= 0.85x | yes |"), "{t}");
        assert!(t.contains("| 4 KiB random read 16 x 128 | 8.00 M IOPS | 10.00 M IOPS (the copy kernel alone) | 0.80x | >= 0.85x | no |"), "{t}");
        assert!(
            t.contains("| 4 KiB random read 1 x 32 | 1.80 M IOPS | 2.00 M IOPS"),
            "{t}"
        );
        assert!(
            t.contains("| QD1 4 KiB read p50 | 7.7 us | 7.0 us | 1.10x | <= 1.05x | no |"),
            "{t}"
        );
        assert!(t.contains("| 512 KiB sequential read 4 x 32 | 47.2 GB/s | 40.0 GB/s | 1.18x | >= 0.95x | yes |"), "{t}");
    }
}
