//! `engine-bench --compress-check [FILE...]`: the page codec's GPU kernels
//! (cuda-store's page_kernels, issue 18) against the Rust reference
//! (vramblk-compress) on real swap content, and timed.
//!
//! Checks: every page the GPU compresses comes out as the reference's
//! bytes (kind, length and block); every block decompresses on the GPU to
//! the page it came from; a truncated block is reported corrupt, never
//! decoded. Pages are read from the FILEs (raw 4 KiB pages, e.g. the
//! corpus of `cargo xtask corpus`, `--mib` of each) or, with none given,
//! made here (text-like, table-like, zero and random pages).
//!
//! Times, on one thread: 16 streams x 128 pages, 1 x 32 and 1 x 1 per
//! round (engine-bench's 4 KiB shapes), pages read from and written to
//! pinned, device-mapped host memory (where a queue's io buffers are) and
//! VRAM staging; beside it the copy kernel alone at the same shapes
//! (cuda-store's ceiling, compression off), in the same process.

use anyhow::{bail, Context, Result};
use cudarc::driver::result::{self, stream};
use cudarc::driver::sys;
use std::path::PathBuf;
use std::time::Instant;
use vramblk_compress::{encode_page, lz, Stored, PAGE};
use vramblk_cuda_store::page_kernels::{kind, PageJob, PageKernels};
use vramblk_cuda_store::CudaStore;

/// One source of pages: its name and its pages.
struct Source {
    name: String,
    pages: Vec<[u8; PAGE]>,
}

fn read_sources(files: &[PathBuf], mib: u64) -> Result<Vec<Source>> {
    let mut out = Vec::new();
    for f in files {
        let data = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        let want = ((mib << 20) as usize).min(data.len()) / PAGE;
        // Spread over the file: every k-th page, so a sample is not one
        // region of one program.
        let all = data.len() / PAGE;
        let step = (all / want.max(1)).max(1);
        let pages = (0..want)
            .map(|i| {
                let at = (i * step) * PAGE;
                data[at..at + PAGE].try_into().unwrap()
            })
            .collect();
        let name = f
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push(Source { name, pages });
    }
    if out.is_empty() {
        out = made_sources();
    }
    if !out.iter().any(|s| s.name == "random") {
        out.push(Source {
            name: "random".into(),
            pages: random_pages(2048),
        });
    }
    Ok(out)
}

fn random_pages(n: usize) -> Vec<[u8; PAGE]> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            let mut p = [0u8; PAGE];
            for w in p.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            p
        })
        .collect()
}

/// Pages of swap-like shapes when no corpus is given.
fn made_sources() -> Vec<Source> {
    let mut pages = Vec::new();
    for n in 0..2048usize {
        let mut p = [0u8; PAGE];
        match n % 4 {
            0 => {}
            1 => {
                for (i, b) in p.iter_mut().enumerate() {
                    *b = b"struct page *swap_entry; // vram "[(i * 7 + n) % 33];
                }
            }
            2 => {
                for (i, w) in p.chunks_exact_mut(8).enumerate() {
                    w.copy_from_slice(
                        &((0x7f3a_0000_0000 + n * 4096 + (i % 37) * 64) as u64).to_le_bytes(),
                    );
                }
            }
            _ => {
                for (i, w) in p.chunks_exact_mut(4).enumerate() {
                    w.copy_from_slice(&(((i * n) % 97) as u32).to_le_bytes());
                }
            }
        }
        pages.push(p);
    }
    vec![Source {
        name: "made".into(),
        pages,
    }]
}

/// Pinned host memory mapped for the device, and VRAM; freed on drop.
struct Memory {
    host_in: *mut u8,
    host_out: *mut u8,
    dev_in: u64,
    dev_out: u64,
    staging: u64,
    jobs: u64,
    bytes: usize,
    jobs_bytes: usize,
}

impl Memory {
    fn new(pages: usize) -> Result<Memory> {
        let bytes = pages * PAGE;
        let jobs_bytes = pages * std::mem::size_of::<PageJob>();
        let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
        let mut m = Memory {
            host_in: std::ptr::null_mut(),
            host_out: std::ptr::null_mut(),
            dev_in: 0,
            dev_out: 0,
            staging: 0,
            jobs: 0,
            bytes,
            jobs_bytes,
        };
        // SAFETY: allocations in the current context, freed in Drop; the
        // device-pointer query takes valid out-pointers and a DEVICEMAP
        // allocation (it is not in cudarc's result layer).
        unsafe {
            m.host_in = result::malloc_host(bytes, flags)
                .context("cuMemHostAlloc")?
                .cast();
            m.host_out = result::malloc_host(bytes, flags)
                .context("cuMemHostAlloc")?
                .cast();
            sys::cuMemHostGetDevicePointer_v2(&mut m.dev_in, m.host_in.cast(), 0)
                .result()
                .context("mapping pinned memory")?;
            sys::cuMemHostGetDevicePointer_v2(&mut m.dev_out, m.host_out.cast(), 0)
                .result()
                .context("mapping pinned memory")?;
            m.staging = result::malloc_sync(bytes).context("cuMemAlloc")?;
            m.jobs = result::malloc_sync(jobs_bytes).context("cuMemAlloc")?;
        }
        Ok(m)
    }

    fn input(&mut self) -> &mut [u8] {
        // SAFETY: `bytes` bytes of pinned memory this value owns.
        unsafe { std::slice::from_raw_parts_mut(self.host_in, self.bytes) }
    }

    fn output(&mut self) -> &mut [u8] {
        // SAFETY: as input().
        unsafe { std::slice::from_raw_parts_mut(self.host_out, self.bytes) }
    }

    fn put_jobs(&self, jobs: &[PageJob]) -> Result<()> {
        assert!(std::mem::size_of_val(jobs) <= self.jobs_bytes);
        // SAFETY: the job array is as large as the allocation allows.
        unsafe { result::memcpy_htod_sync(self.jobs, jobs) }.context("copying jobs")?;
        Ok(())
    }

    fn get_jobs(&self, jobs: &mut [PageJob]) -> Result<()> {
        // SAFETY: as put_jobs.
        unsafe { result::memcpy_dtoh_sync(jobs, self.jobs) }.context("reading jobs back")?;
        Ok(())
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: each was allocated in new() and is not used after this.
        unsafe {
            for p in [self.host_in, self.host_out] {
                if !p.is_null() {
                    let _ = result::free_host(p.cast());
                }
            }
            for d in [self.staging, self.jobs] {
                if d != 0 {
                    let _ = result::free_sync(d);
                }
            }
        }
    }
}

/// Runs the check and the timings; prints a report; exit status 0 or 1.
pub fn run(gpu: u32, files: &[PathBuf], mib: u64, secs: f64) -> Result<i32> {
    let sources = read_sources(files, mib)?;
    let store = match CudaStore::context_only(gpu) {
        Ok(s) => s,
        Err(e) => {
            println!("SKIPPED: {e}");
            return Ok(crate::SKIPPED);
        }
    };
    store.make_current().context("making the context current")?;
    let kernels = PageKernels::load().context("loading the page kernels")?;
    let n: usize = sources.iter().map(|s| s.pages.len()).sum();
    let mut mem = Memory::new(n)?;
    for (i, p) in sources.iter().flat_map(|s| s.pages.iter()).enumerate() {
        mem.input()[i * PAGE..(i + 1) * PAGE].copy_from_slice(p);
    }
    println!(
        "GPU: {}, `engine-bench --compress-check` on {n} pages ({} sources), {}",
        store.gpu_name(),
        sources.len(),
        crate::utc_now()
    );
    let stream = stream::create(stream::StreamKind::NonBlocking).context("cuStreamCreate")?;
    let mut failures = 0;

    // Compress everything once; compare with the reference.
    let mut jobs: Vec<PageJob> = (0..n)
        .map(|i| PageJob {
            src: mem.dev_in + (i * PAGE) as u64,
            dst: mem.staging + (i * PAGE) as u64,
            ..Default::default()
        })
        .collect();
    mem.put_jobs(&jobs)?;
    // SAFETY: n jobs in the job array, each naming memory alive until the
    // stream is synchronised below.
    unsafe { kernels.launcher().compress(mem.jobs, n as u32, stream) }?;
    stream_sync(stream)?;
    mem.get_jobs(&mut jobs)?;
    let mut staged = vec![0u8; n * PAGE];
    // SAFETY: the staging allocation holds n pages.
    unsafe { result::memcpy_dtoh_sync(&mut staged[..], mem.staging) }.context("reading blocks")?;
    let mut differ = Vec::new();
    let mut mismatched = 0usize;
    let mut block = [0u8; PAGE];
    let mut offset = 0;
    for s in &sources {
        let (mut stored, mut same, mut raw) = (0u64, 0u64, 0u64);
        for (k, page) in s.pages.iter().enumerate() {
            let i = offset + k;
            let (j, gpu_block) = (jobs[i], &staged[i * PAGE..(i + 1) * PAGE]);
            let agrees = match encode_page(page, &mut block) {
                Stored::Same(w) => {
                    same += 1;
                    j.kind == kind::SAME && j.word == w
                }
                Stored::Compressed(len) => {
                    stored += vramblk_compress::class_of(len).map_or(PAGE, |c| c.bytes()) as u64;
                    j.kind == kind::COMPRESSED
                        && j.len as usize == len
                        && gpu_block[..len] == block[..len]
                }
                Stored::Raw => {
                    raw += 1;
                    stored += PAGE as u64;
                    j.kind == kind::RAW && j.len as usize == PAGE && gpu_block == page
                }
            };
            if !agrees && differ.len() < 5 {
                differ.push(format!(
                    "{} page {k}: GPU kind {} len {}",
                    s.name, j.kind, j.len
                ));
            }
            mismatched += usize::from(!agrees);
        }
        println!(
            "  {}: {} pages, {same} same-filled, {raw} stored whole, ratio {:.2} in 128 B classes",
            s.name,
            s.pages.len(),
            (s.pages.len() * PAGE) as f64 / stored.max(1) as f64
        );
        offset += s.pages.len();
    }
    report(
        &mut failures,
        mismatched == 0,
        format!(
            "the GPU's blocks are the reference's, byte for byte, on all {n} pages ({mismatched} differ){}",
            if differ.is_empty() {
                String::new()
            } else {
                format!(" (first differences: {})", differ.join("; "))
            }
        ),
    );

    // Decompress every block into pinned memory; compare with the input.
    let back: Vec<PageJob> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| PageJob {
            src: mem.staging + (i * PAGE) as u64,
            dst: mem.dev_out + (i * PAGE) as u64,
            ..*j
        })
        .collect();
    mem.output().fill(0xA5);
    let mut after = back.clone();
    mem.put_jobs(&back)?;
    // SAFETY: as above.
    unsafe { kernels.launcher().decompress(mem.jobs, n as u32, stream) }?;
    stream_sync(stream)?;
    mem.get_jobs(&mut after)?;
    let flagged = after.iter().filter(|j| j.kind & kind::CORRUPT != 0).count();
    let input = mem.input().to_vec();
    let wrong = (0..n)
        .filter(|&i| mem.output()[i * PAGE..(i + 1) * PAGE] != input[i * PAGE..(i + 1) * PAGE])
        .count();
    report(
        &mut failures,
        flagged == 0 && wrong == 0,
        format!("every page comes back from the GPU as it was ({wrong} differ, {flagged} called corrupt)"),
    );

    // The reference decodes what the GPU wrote (already implied by equal
    // bytes; this holds the decoder to GPU output directly).
    let mut decoded_ok = 0;
    let mut compressed = 0;
    for (i, j) in jobs.iter().enumerate() {
        if j.kind == kind::COMPRESSED {
            compressed += 1;
            let mut page = [0u8; PAGE];
            let ok = lz::decompress(&staged[i * PAGE..i * PAGE + j.len as usize], &mut page)
                .is_ok()
                && page[..] == input[i * PAGE..(i + 1) * PAGE];
            decoded_ok += usize::from(ok);
        }
    }
    report(
        &mut failures,
        decoded_ok == compressed,
        format!("the reference decodes the GPU's {compressed} blocks ({decoded_ok} right)"),
    );

    // Truncated blocks: each must be called corrupt.
    let truncated: Vec<PageJob> = back
        .iter()
        .filter(|j| j.kind == kind::COMPRESSED && j.len > 1)
        .map(|j| PageJob {
            len: j.len - 1,
            ..*j
        })
        .collect();
    let mut seen = truncated.clone();
    mem.put_jobs(&truncated)?;
    // SAFETY: as above.
    unsafe {
        kernels
            .launcher()
            .decompress(mem.jobs, truncated.len() as u32, stream)
    }?;
    stream_sync(stream)?;
    mem.get_jobs(&mut seen)?;
    let caught = seen.iter().filter(|j| j.kind & kind::CORRUPT != 0).count();
    report(
        &mut failures,
        caught == truncated.len(),
        format!(
            "a block cut short by one byte is called corrupt ({caught} of {})",
            truncated.len()
        ),
    );

    if secs > 0.0 {
        timings(&store, &kernels, &mem, &sources, &jobs, stream, secs)?;
    }
    // SAFETY: the stream was created above and nothing uses it now.
    let _ = unsafe { stream::destroy(stream) };
    println!(
        "compress check: {}",
        if failures == 0 { "PASS" } else { "FAIL" }
    );
    Ok(i32::from(failures != 0))
}

fn report(failures: &mut usize, ok: bool, what: String) {
    println!("{} {what}", if ok { "PASS" } else { "FAIL" });
    *failures += usize::from(!ok);
}

fn stream_sync(s: sys::CUstream) -> Result<()> {
    // SAFETY: a stream this module created.
    unsafe { stream::synchronize(s) }.context("waiting for the page kernels")?;
    Ok(())
}

/// The shapes timed: (streams, pages per launch), as engine-bench's 4 KiB
/// shapes (queues x depth).
const SHAPES: [(usize, usize); 3] = [(16, 128), (1, 32), (1, 1)];

#[allow(clippy::too_many_arguments)]
fn timings(
    store: &CudaStore,
    kernels: &PageKernels,
    mem: &Memory,
    sources: &[Source],
    compressed: &[PageJob],
    _stream: sys::CUstream,
    secs: f64,
) -> Result<()> {
    let random_at = {
        let mut at = 0;
        for s in sources {
            if s.name == "random" {
                break;
            }
            at += s.pages.len();
        }
        at
    };
    let n = compressed.len();
    let sets = [("corpus", 0..random_at), ("random", random_at..n)];
    let streams: Vec<sys::CUstream> = (0..16)
        .map(|_| stream::create(stream::StreamKind::NonBlocking))
        .collect::<Result<_, _>>()
        .context("cuStreamCreate")?;
    println!("| pages | shape | compress pages/s | GB/s | round p50 us | decompress pages/s | GB/s | round p50 us | copy kernel alone (write / read) |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (set, range) in sets {
        if range.is_empty() {
            continue;
        }
        for (nstreams, depth) in SHAPES {
            let mut row = format!("| {set} | {nstreams} x {depth} |");
            for decompress in [false, true] {
                // Jobs for every page of the set, as each direction wants.
                let jobs: Vec<PageJob> = range
                    .clone()
                    .map(|i| {
                        if decompress {
                            PageJob {
                                src: mem.staging + (i * PAGE) as u64,
                                dst: mem.dev_out + (i * PAGE) as u64,
                                ..compressed[i]
                            }
                        } else {
                            PageJob {
                                src: mem.dev_in + (i * PAGE) as u64,
                                dst: mem.staging + (i * PAGE) as u64,
                                ..Default::default()
                            }
                        }
                    })
                    .collect();
                mem.put_jobs(&jobs)?;
                let per_round = nstreams * depth;
                let windows = (jobs.len() / per_round).max(1);
                let mut launches = Vec::new();
                let (mut pages, started) = (0u64, Instant::now());
                let mut w = 0;
                while started.elapsed().as_secs_f64() < secs {
                    let t = Instant::now();
                    for (s, st) in streams.iter().take(nstreams).enumerate() {
                        let first = (w % windows) * per_round + s * depth;
                        let count = depth.min(jobs.len().saturating_sub(first));
                        let at = mem.jobs + (first * std::mem::size_of::<PageJob>()) as u64;
                        // SAFETY: `count` jobs from `first` in the job array;
                        // the memory they name lives until the syncs below.
                        unsafe {
                            if decompress {
                                kernels.launcher().decompress(at, count as u32, *st)?
                            } else {
                                kernels.launcher().compress(at, count as u32, *st)?
                            }
                        }
                        pages += count as u64;
                    }
                    for st in streams.iter().take(nstreams) {
                        stream_sync(*st)?;
                    }
                    launches.push(t.elapsed().as_secs_f64() * 1e6);
                    w += 1;
                }
                let elapsed = started.elapsed().as_secs_f64();
                launches.sort_by(f64::total_cmp);
                let p50 = launches.get(launches.len() / 2).copied().unwrap_or(0.0);
                let rate = pages as f64 / elapsed;
                row += &format!(
                    " {:.2} M | {:.1} | {p50:.1} |",
                    rate / 1e6,
                    rate * PAGE as f64 / 1e9
                );
            }
            let write = vramblk_cuda_store::ceiling::raw_gather_iops(
                store,
                nstreams as u16,
                depth,
                true,
                secs.min(1.0),
            )
            .map_or("-".into(), |v| format!("{:.2} M", v / 1e6));
            let read = vramblk_cuda_store::ceiling::raw_gather_iops(
                store,
                nstreams as u16,
                depth,
                false,
                secs.min(1.0),
            )
            .map_or("-".into(), |v| format!("{:.2} M", v / 1e6));
            store.make_current()?;
            println!("{row} {write} / {read} |");
        }
    }
    for st in streams {
        // SAFETY: created above, synchronised, unused after this.
        let _ = unsafe { stream::destroy(st) };
    }
    if sources.is_empty() {
        bail!("no pages");
    }
    Ok(())
}
