//! `systemd-analyze verify` over the shipped units, as part of `cargo
//! xtask test`. The units name /usr/local/bin/vramblk, which need not
//! exist here, so a copy with that path swapped for the freshly built
//! binary is verified.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

const UNITS: &[&str] = &[
    "vramblk.service",
    "vramblk-sleep.service",
    "vramblk-metrics.service",
    "vramblk-metrics.timer",
];

pub fn verify(root: &Path) -> Result<()> {
    println!("== systemd-analyze verify {}", UNITS.join(" "));
    crate::build_release(root, &["-p", "vramblk-cli"])?;
    let binary = root.join("target/release/vramblk");
    let dir = root.join("target/units");
    std::fs::create_dir_all(&dir)?;
    let mut paths = Vec::new();
    for unit in UNITS {
        let text = std::fs::read_to_string(root.join("systemd").join(unit))
            .with_context(|| format!("reading systemd/{unit}"))?;
        let path = dir.join(unit);
        std::fs::write(
            &path,
            text.replace("/usr/local/bin/vramblk", &binary.to_string_lossy()),
        )?;
        paths.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .context("running systemd-analyze (package systemd)")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Warnings about the host's own units are not ours.
    let ours: Vec<&str> = said
        .lines()
        .filter(|l| UNITS.iter().any(|u| l.contains(u)))
        .collect();
    if !out.status.success() || !ours.is_empty() {
        bail!("systemd-analyze verify: FAIL\n{said}");
    }
    println!("PASS systemd-analyze verify: {} clean", UNITS.join(", "));
    Ok(())
}

/// engine-bench's checks (`--checks-only`) on the stand-in libcuda: the
/// cuda store's allocation, hand-over and import, copy kernel descriptor
/// tables, back-off and erase, run where there is no GPU; then its page
/// codec check (`--compress-check`) on pages it makes. Host memory
/// behind the driver calls: it says nothing about a GPU.
pub fn stub_checks(root: &Path) -> Result<()> {
    println!(
        "== cuda-store checks on the stand-in libcuda (cuda-store/tests/stub; not GPU evidence)"
    );
    let stub = crate::suite::build_cuda_stub(root)?;
    crate::build_release(root, &["-p", "vramblk-bench"])?;
    let dir = stub.parent().context("stub without a directory")?;
    // Then as a CUDA 11.4 driver, where the CUDA 12 entry points must not
    // be called (a lone write's checksums go as a copy then).
    for driver in ["12080", "11040"] {
        println!("== the stand-in reports driver version {driver}");
        crate::sh(
            Command::new(root.join("target/release/engine-bench"))
                .arg("--checks-only")
                .env("LD_LIBRARY_PATH", dir)
                .env("VRAMBLK_STUB_VRAM_MIB", "16384")
                .env("VRAMBLK_STUB_DRIVER", driver),
        )
        .with_context(|| format!("cuda-store checks on the stub as driver {driver}"))?;
    }
    // The page codec's kernels as the stand-in runs them (its C port of
    // the format) against the Rust reference, through cuda-store's
    // launches: what the GPU's own check holds the real kernels to.
    println!("== the page codec's kernels on the stand-in (engine-bench --compress-check)");
    crate::sh(
        Command::new(root.join("target/release/engine-bench"))
            .args(["--compress-check", "--secs", "0"])
            .env("LD_LIBRARY_PATH", dir),
    )
    .context("the page kernels' check on the stub")?;
    Ok(())
}
