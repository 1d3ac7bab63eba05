//! The guest kernel: Debian's 6.12 cloud kernel, fetched once with
//! apt-get download and cached under target/vm/kernel.

use crate::sh;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const PACKAGE: &str = "linux-image-6.12.107+deb12-cloud-amd64-unsigned";
const RELEASE: &str = "6.12.107+deb12-cloud-amd64";

/// Modules copied into every initramfs, in load order: ublk for vramblk,
/// and the peers the benchmark compares it with (NBD, zram and what zram
/// needs).
const MODULES: &[&str] = &[
    "drivers/block/ublk_drv",
    "drivers/block/nbd",
    "mm/zsmalloc",
    "lib/lz4/lz4_compress",
    "lib/lz4/lz4hc_compress",
    "drivers/block/zram/zram",
];

pub struct Kernel {
    pub vmlinuz: PathBuf,
    /// Decompressed modules the initramfs loads, by file name.
    pub modules: Vec<PathBuf>,
}

pub fn fetch(cache: &Path) -> Result<Kernel> {
    let tree = cache.join("tree");
    let vmlinuz = tree.join(format!("boot/vmlinuz-{RELEASE}"));
    if !vmlinuz.exists() {
        std::fs::create_dir_all(cache)?;
        println!("== fetching {PACKAGE}");
        if Command::new("apt-get")
            .args(["download", PACKAGE])
            .current_dir(cache)
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            sh(Command::new("apt-get").args(["update", "-qq"]))?;
            sh(Command::new("apt-get")
                .args(["download", PACKAGE])
                .current_dir(cache))?;
        }
        let deb = std::fs::read_dir(cache)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("apt-get download left no .deb")?;
        sh(Command::new("dpkg").arg("-x").arg(&deb).arg(&tree))?;
    }
    let kdir = tree.join(format!("lib/modules/{RELEASE}/kernel"));
    let mut modules = Vec::new();
    for rel in MODULES {
        let name = Path::new(rel)
            .file_name()
            .and_then(|n| n.to_str())
            .context("module without a name")?;
        let ko = cache.join(format!("{name}.ko"));
        if !ko.exists() {
            let xz = kdir.join(format!("{rel}.ko.xz"));
            if !xz.exists() {
                bail!("{} is missing from {PACKAGE}", xz.display());
            }
            let out = Command::new("xz").arg("-dc").arg(&xz).output()?;
            if !out.status.success() {
                bail!("xz -dc {} failed", xz.display());
            }
            std::fs::write(&ko, out.stdout)?;
        }
        modules.push(ko);
    }
    Ok(Kernel { vmlinuz, modules })
}
