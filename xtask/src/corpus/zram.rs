//! The same pages through zram, in one VM boot: a sample of each source is
//! written to a zram device with lz4 and with zstd (zram's default level),
//! and zram's own accounting (mm_stat: bytes stored, bytes compressed,
//! same-filled pages) is set beside what the crates measure on the very
//! same bytes in this process.

use super::capture::PAGE;
use super::measure::{self, Measured};
use super::Source;
use crate::{initramfs, kernel, qemu};
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

const INIT: &str = include_str!("../../vm/init.sh");
const GUEST: &str = include_str!("../../vm/corpus-zram.sh");

/// Bytes of each source the guest gets: a sample, taken in blocks spread
/// over the whole source.
const SAMPLE: usize = 8 << 20;
const BLOCK: usize = 16 * PAGE;

/// What zram said of one source with one algorithm.
#[derive(Debug, PartialEq)]
pub struct ZramStat {
    pub source: String,
    pub alg: String,
    pub orig: u64,
    pub compr: u64,
    pub same: u64,
}

impl ZramStat {
    fn ratio(&self) -> f64 {
        self.orig as f64 / self.compr.max(1) as f64
    }
}

/// `CORPUS-ZRAM NAME ALG <mm_stat fields>`: orig_data_size,
/// compr_data_size, mem_used_total, mem_limit, mem_used_max, same_pages...
fn parse(lines: &[String]) -> Vec<ZramStat> {
    lines
        .iter()
        .filter_map(|l| {
            let rest = &l[l.find("CORPUS-ZRAM ")? + "CORPUS-ZRAM ".len()..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            Some(ZramStat {
                source: f[0].into(),
                alg: f[1].into(),
                orig: f[2].parse().ok()?,
                compr: f[3].parse().ok()?,
                same: f[7].parse().ok()?,
            })
        })
        .collect()
}

/// Up to SAMPLE bytes of `data`, in BLOCK-sized pieces evenly spread.
pub(super) fn sample(data: &[u8]) -> Vec<u8> {
    let blocks = data.len() / BLOCK;
    let want = SAMPLE / BLOCK;
    if blocks <= want {
        return data[..blocks * BLOCK].to_vec();
    }
    (0..want)
        .flat_map(|i| {
            let b = i * blocks / want;
            data[b * BLOCK..(b + 1) * BLOCK].iter().copied()
        })
        .collect()
}

/// Boots the VM with a sample of every source and returns the table.
pub fn compare(root: &Path, sources: &[Source]) -> Result<String> {
    let vm_dir = root.join("target/vm");
    let dir = root.join("target/corpus/zram-sample");
    std::fs::create_dir_all(&dir)?;
    let mut copies: Vec<(PathBuf, String)> = Vec::new();
    let mut ours = Vec::new();
    for s in sources {
        let data =
            std::fs::read(&s.file).with_context(|| format!("reading {}", s.file.display()))?;
        let part = sample(&data);
        let file = dir.join(format!("{}.pages", s.name));
        std::fs::write(&file, &part)?;
        ours.push((s.name.clone(), measure::measure(&part)?));
        copies.push((file, format!("/corpus/{}.pages", s.name)));
    }
    let kernel = kernel::fetch(&vm_dir)?;
    println!("== zram on the same pages: Debian's {}", kernel.release);
    let copies: Vec<(PathBuf, &str)> = copies
        .iter()
        .map(|(h, g)| (h.clone(), g.as_str()))
        .collect();
    let stage = vm_dir.join("stage-corpus");
    let initrd = vm_dir.join("initrd-corpus.cpio");
    initramfs::build(
        &stage,
        &initrd,
        &initramfs::Spec {
            host_bins: &[],
            built_bins: &[],
            copies: &copies,
            modules: &kernel.modules,
            files: &[("/init", INIT), ("/lib/vm/suite.sh", GUEST)],
        },
    )?;
    let r = qemu::boot(&qemu::Boot {
        name: "corpus",
        vmlinuz: &kernel.vmlinuz,
        initrd: &initrd,
        memory: "1G",
        cpus: 2,
        cmdline_extra: "",
        timeout: Duration::from_secs(15 * 60),
        idle_timeout: Some(Duration::from_secs(300)),
        log: &vm_dir.join("console-corpus.log"),
    })?;
    let stats = parse(&r.lines);
    if stats.is_empty() {
        bail!("the guest reported nothing from zram (see target/vm/console-corpus.log)");
    }
    Ok(table(&kernel.release, &ours, &stats))
}

fn table(release: &str, ours: &[(String, Measured)], zram: &[ZramStat]) -> String {
    let find = |name: &str, alg: &str| zram.iter().find(|z| z.source == name && z.alg == alg);
    let mut t = format!(
        "zram on Debian's {release} (one VM boot) and the crates in this process, on the same \
         sample of each source ({} MiB, in 64 KiB blocks spread over it):\n\n\
         | source | same-filled: crates / zram | lz4: lz4_flex / zram | zstd: zstd-3 / zram (its default level) |\n\
         | --- | ---: | ---: | ---: |\n",
        SAMPLE >> 20
    );
    for (name, m) in ours {
        let cell = |z: Option<&ZramStat>, ours: f64| match z {
            Some(z) => format!("{ours:.2} / {:.2}", z.ratio()),
            None => format!("{ours:.2} / -"),
        };
        let same = find(name, "lz4").map_or("-".into(), |z| z.same.to_string());
        let _ = writeln!(
            t,
            "| {name} | {} / {same} pages | {} | {} |",
            m.same,
            cell(find(name, "lz4"), m.ratio(0)),
            cell(find(name, "zstd"), m.ratio(2)),
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mm_stat_lines_are_read() {
        let lines = vec![
            "[corpus] CORPUS-ZRAM python lz4 8388608 2097152 2310144 0 2310144 12 0 3 3"
                .to_string(),
            "[corpus] noise".into(),
            "CORPUS-ZRAM random zstd 8388608".into(),
        ];
        let s = parse(&lines);
        assert_eq!(
            s,
            vec![ZramStat {
                source: "python".into(),
                alg: "lz4".into(),
                orig: 8388608,
                compr: 2097152,
                same: 12
            }]
        );
        assert!((s[0].ratio() - 4.0).abs() < 1e-9);
    }

    #[test]
    fn samples_spread_over_the_source_in_whole_blocks() {
        let small = vec![7u8; 3 * BLOCK + 5];
        assert_eq!(sample(&small).len(), 3 * BLOCK);
        let big: Vec<u8> = (0..(SAMPLE / BLOCK * 4))
            .flat_map(|b| vec![b as u8; BLOCK])
            .collect();
        let s = sample(&big);
        assert_eq!(s.len(), SAMPLE);
        // Every 4th block: the first and the last taken are far apart.
        assert_eq!(s[0], 0);
        assert_eq!(s[SAMPLE - 1], ((SAMPLE / BLOCK - 1) * 4) as u8);
    }
}
