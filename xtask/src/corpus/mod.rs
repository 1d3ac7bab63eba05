//! `cargo xtask corpus`: a corpus of real swap content (issue 18), and how
//! it compresses page by page on the CPU.
//!
//! Capture: programs of kinds whose memory ends up in swap (Python data, a
//! JavaScript heap, a database's page cache, a shell) are started and
//! their resident anonymous pages read (capture.rs), as are the compiler
//! processes of a `cargo check` of this workspace while it runs, plus
//! random pages as the worst case. Each source is one file of raw 4 KiB
//! pages under target/corpus/ (not committed: a few hundred MiB), listed in
//! manifest.tsv. Measure: same-filled pages, LZ4 and zstd per page
//! (measure.rs); `--zram` sets zram's own figures beside them on the same
//! pages (zram.rs, one VM boot); `--report` writes the tables into
//! docs/benchmarks.md.

mod capture;
mod measure;
mod workloads;
mod zram;

use anyhow::{bail, Context, Result};
use capture::PAGE;
use measure::{Measured, CODECS};
use std::fmt::Write as _;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Where the corpus goes (default: target/corpus).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// MiB of pages to take from each source at most.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    mib_per_source: u64,
    /// Measure the corpus already in --out instead of capturing anew.
    #[arg(long)]
    measure_only: bool,
    /// Also write a sample of every source to zram (lz4, zstd) in one VM
    /// boot (VRAMBLK_VM_KERNEL picks the kernel) and set zram's figures
    /// beside the crates' on the same pages.
    #[arg(long)]
    zram: bool,
    /// Write the tables into docs/benchmarks.md.
    #[arg(long)]
    report: bool,
}

const BEGIN: &str = "<!-- cargo xtask corpus: begin (generated; edits here are overwritten) -->";
const END: &str = "<!-- cargo xtask corpus: end -->";

/// One source of the corpus: its name, what it is, and its file.
pub struct Source {
    name: String,
    what: String,
    file: PathBuf,
}

/// Set in the release build `run` starts, so it does not start another.
const RELEASE_ENV: &str = "VRAMBLK_CORPUS_RELEASE";

pub fn run(root: &Path, o: &Options) -> Result<()> {
    if cfg!(debug_assertions) && std::env::var_os(RELEASE_ENV).is_none() {
        // The codecs are generic code built into xtask itself: timed in a
        // debug build, LZ4 runs ~20x slower than it does. So the timing
        // runs in a release build of xtask, with the same arguments.
        println!("== corpus: running in a release build of xtask (the codecs are timed)");
        return crate::sh(
            std::process::Command::new(crate::cargo())
                .args([
                    "run",
                    "--release",
                    "--quiet",
                    "-p",
                    "xtask",
                    "--bin",
                    "xtask",
                    "--",
                ])
                .args(std::env::args_os().skip(1))
                .env(RELEASE_ENV, "1")
                .current_dir(root),
        );
    }
    let out = o.out.clone().unwrap_or_else(|| root.join("target/corpus"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let limit = o.mib_per_source << 20;
    if !o.measure_only {
        capture_all(root, &out, limit)?;
    }
    let sources = read_manifest(&out)?;
    let mut rows = Vec::new();
    for s in &sources {
        let data =
            std::fs::read(&s.file).with_context(|| format!("reading {}", s.file.display()))?;
        println!("== measuring {} ({} MiB)", s.name, data.len() >> 20);
        rows.push((s, measure::measure(&data)?));
    }
    let mut table = table(&rows);
    if o.zram {
        table.push('\n');
        table.push_str(&zram::compare(root, &sources)?);
    }
    println!("{table}");
    if o.report {
        let section = format!(
            "{BEGIN}\n## Compression of real swap content, page by page, on the CPU (`cargo xtask corpus`)\n\n\
             Each 4 KiB page on its own, as a swap store compresses: same-filled pages (every\n\
             8-byte word equal, zram's `same_pages`) cost nothing; a page that does not shrink is\n\
             stored whole. Ratio = bytes of pages over bytes stored (zramctl's DATA / COMPR); \"in\n\
             128 B classes\": each page in a slot of whole 128-byte steps, a page needing more than\n\
             3968 bytes stored whole (the size classes of vramblk-compress, what compressed VRAM\n\
             holds). `vramblk`: vramblk's own page codec (LZ4 blocks, the GPU kernels' search, on\n\
             the CPU here). Speed: compression only, one thread of this machine's CPU, over the pages\n\
             not same-filled. Every page is decompressed and compared. The sources are programs'\n\
             resident anonymous memory, read from /proc when the command ran, and random pages.\n\n{table}\n{END}"
        );
        crate::docs::splice(&root.join("docs/benchmarks.md"), BEGIN, END, &section)?;
        println!("wrote the table into docs/benchmarks.md");
    }
    Ok(())
}

/// The markdown table of every source and the whole corpus.
fn table(rows: &[(&Source, Measured)]) -> String {
    let mut t = String::from("| source | MiB | same-filled (zero) |");
    for c in CODECS {
        let _ = write!(
            t,
            " {} ratio | in {} B classes | {} MB/s |",
            c.name(),
            measure::CLASS,
            c.name()
        );
    }
    t.push_str("\n| --- | ---: | ---: |");
    for _ in CODECS {
        t.push_str(" ---: | ---: | ---: |");
    }
    t.push('\n');
    let mut all = Measured::default();
    let mut real = Measured::default();
    let mut line = |name: &str, m: &Measured| {
        let pct = |n: u64| 100.0 * n as f64 / m.pages.max(1) as f64;
        let _ = write!(
            t,
            "| {name} | {} | {:.1}% ({:.1}%) |",
            (m.pages * PAGE as u64) >> 20,
            pct(m.same),
            pct(m.zero)
        );
        for i in 0..CODECS.len() {
            let _ = write!(
                t,
                " {:.2} | {:.2} | {:.0} |",
                m.ratio(i),
                m.class_ratio(i),
                m.speed_mb_s(i)
            );
        }
        t.push('\n');
    };
    for (s, m) in rows {
        line(&format!("{} ({})", s.name, s.what), m);
        all.add(m);
        if s.name != "random" {
            real.add(m);
        }
    }
    line("**every program above**", &real);
    line("**all, random included**", &all);
    let decode: Vec<String> = CODECS
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} {:.2} us", c.name(), real.decode_us(i)))
        .collect();
    let _ = write!(
        t,
        "\nDecoding a compressed page of the programs, one thread of this CPU: {}.\n",
        decode.join(", ")
    );
    t
}

/// Captures every source into `out` (replacing what was there) and writes
/// the manifest.
fn capture_all(root: &Path, out: &Path, limit: u64) -> Result<()> {
    let mut manifest = String::new();
    for h in workloads::holders() {
        if !h.available() {
            println!("== {}: not on this machine; left out", h.name);
            continue;
        }
        println!("== {}: starting ({})", h.name, h.what);
        let mut child = h.start()?;
        let file = out.join(format!("{}.pages", h.name));
        let mut w = BufWriter::new(std::fs::File::create(&file)?);
        let pages = capture::resident_anon_pages(child.id(), limit, &mut w);
        let _ = child.kill();
        let _ = child.wait();
        let pages = pages?;
        w.flush()?;
        println!("== {}: {} MiB", h.name, (pages * PAGE as u64) >> 20);
        let _ = writeln!(manifest, "{}\t{}\t{}", h.name, file.display(), h.what);
    }
    let file = out.join("rustc.pages");
    let mut w = BufWriter::new(std::fs::File::create(&file)?);
    let mut taken = 0u64;
    println!("== rustc: capturing the compiler during `cargo check` of this workspace");
    workloads::during_build(
        root,
        &out.join("check-target"),
        Duration::from_secs(2),
        |pid| {
            // A little of each compiler seen, so more crates are in it.
            let share = (limit / 8).min(limit - taken);
            if let Ok(n) = capture::resident_anon_pages(pid, share, &mut w) {
                taken += n * PAGE as u64;
            }
            taken < limit
        },
    )?;
    w.flush()?;
    if taken == 0 {
        bail!("no rustc process was captured during the build");
    }
    println!("== rustc: {} MiB", taken >> 20);
    let _ = writeln!(
        manifest,
        "rustc\t{}\trustc compiling this workspace (cargo check)",
        file.display()
    );
    let file = out.join("random.pages");
    write_random(&file, limit.min(32 << 20))?;
    let _ = writeln!(
        manifest,
        "random\t{}\trandom bytes: the worst case",
        file.display()
    );
    std::fs::write(out.join("manifest.tsv"), manifest)?;
    Ok(())
}

/// `len` bytes of a xorshift stream: incompressible, reproducible.
fn write_random(file: &Path, len: u64) -> Result<()> {
    let mut x = 0x9E3779B97F4A7C15u64;
    let mut data = Vec::with_capacity(len as usize);
    while (data.len() as u64) < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_ne_bytes());
    }
    std::fs::write(file, data).with_context(|| format!("writing {}", file.display()))
}

/// The pages the corpus-swap boot fills swap with: a sample of every
/// program's pages (not the random ones), as zram's boot takes it, in one
/// file under target/corpus; its path.
pub fn swap_sample(root: &Path) -> Result<PathBuf> {
    let dir = root.join("target/corpus");
    let mut pages = Vec::new();
    for s in read_manifest(&dir)?.iter().filter(|s| s.name != "random") {
        let data =
            std::fs::read(&s.file).with_context(|| format!("reading {}", s.file.display()))?;
        pages.extend_from_slice(&zram::sample(&data));
    }
    if pages.is_empty() {
        bail!("the corpus in {} has no program's pages", dir.display());
    }
    let file = dir.join("swap-sample.pages");
    std::fs::write(&file, &pages).with_context(|| format!("writing {}", file.display()))?;
    Ok(file)
}

fn read_manifest(out: &Path) -> Result<Vec<Source>> {
    let path = out.join("manifest.tsv");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (run `cargo xtask corpus` first)",
            path.display()
        )
    })?;
    text.lines()
        .map(|l| {
            let mut f = l.splitn(3, '\t');
            match (f.next(), f.next(), f.next()) {
                (Some(n), Some(p), Some(w)) => Ok(Source {
                    name: n.into(),
                    file: p.into(),
                    what: w.into(),
                }),
                _ => bail!("bad manifest line {l:?} in {}", path.display()),
            }
        })
        .collect()
}
