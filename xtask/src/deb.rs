//! `cargo xtask deb [--deb-version V]`: the Debian package, built by
//! cargo-deb from `[package.metadata.deb]` in cli/Cargo.toml. First the
//! assets cargo-deb cannot make: the units with the package's paths
//! (/usr/bin, /usr/share/doc), and the man pages and completion scripts the
//! freshly built binary writes from its own clap definition. Then a check
//! of the package on the host: the files it must hold, the conffile, and
//! every man page rendered by man(1) without a warning.

use crate::sh;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The cargo-deb release the package is built with, installed under
/// target/tools when missing (pinned: its metadata keys and its output are
/// what the checks below read).
const CARGO_DEB_VERSION: &str = "3.8.0";

/// The units whose paths the package rewrites (the timer names no path).
const UNITS_WITH_PATHS: &[&str] = &[
    "vramblk.service",
    "vramblk-sleep.service",
    "vramblk-metrics.service",
];

/// Files the package must install (a check, not the list cargo-deb uses:
/// that one is in cli/Cargo.toml).
const MUST_HOLD: &[&str] = &[
    "./usr/bin/vramblk",
    "./usr/lib/systemd/system/vramblk.service",
    "./usr/lib/systemd/system/vramblk-sleep.service",
    "./usr/lib/systemd/system/vramblk-metrics.service",
    "./usr/lib/systemd/system/vramblk-metrics.timer",
    "./usr/lib/udev/rules.d/90-vramblk-power.rules",
    "./usr/lib/modules-load.d/vramblk.conf",
    "./etc/vramblk.toml",
    "./usr/share/man/man1/vramblk.1.gz",
    "./usr/share/man/man1/vramblk-add.1.gz",
    "./usr/share/man/man5/vramblk.toml.5.gz",
    "./usr/share/bash-completion/completions/vramblk",
    "./usr/share/zsh/vendor-completions/_vramblk",
    "./usr/share/fish/vendor_completions.d/vramblk.fish",
    "./usr/share/doc/vramblk/operations.md",
];

/// `deb` flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Options {
    /// The package's version with its revision (e.g. 0.1.0-2); default:
    /// the crate's version, revision 1.
    #[arg(long, value_name = "VERSION")]
    pub deb_version: Option<String>,
}

/// Builds and checks the package; returns its path.
pub fn build(root: &Path, o: &Options) -> Result<PathBuf> {
    let mut debs = build_versions(root, &[o.deb_version.as_deref()])?;
    debs.pop().context("cargo-deb made no package")
}

/// Builds the binary and the assets once, then one checked package per
/// version (None: the crate's version, revision 1); their paths in order.
pub fn build_versions(root: &Path, versions: &[Option<&str>]) -> Result<Vec<PathBuf>> {
    let cargo_deb = ensure_cargo_deb(root)?;
    crate::build_release(root, &["-p", "vramblk-cli"])?;
    write_assets(root, &root.join("target/release/vramblk"))?;
    versions
        .iter()
        .map(|v| {
            // cargo-deb deletes the package's other .deb files in its
            // output folder, so each named version gets a folder of its own.
            let out_dir = match v {
                None => root.join("target/debian"),
                Some(v) => root.join("target/debian").join(v),
            };
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("creating {}", out_dir.display()))?;
            let deb = package(root, &cargo_deb, &out_dir, *v)?;
            check(&deb)?;
            println!("package: {}", deb.display());
            Ok(deb)
        })
        .collect()
}

/// Runs cargo-deb on what is built; the package's path.
fn package(
    root: &Path,
    cargo_deb: &Path,
    out_dir: &Path,
    version: Option<&str>,
) -> Result<PathBuf> {
    let before = debs_in(out_dir)?;
    println!("== cargo deb -p vramblk-cli");
    let mut cmd = Command::new(cargo_deb);
    cmd.args(["deb", "-p", "vramblk-cli", "--no-build", "--strip", "-o"])
        .arg(out_dir)
        .current_dir(root);
    if let Some(v) = version {
        cmd.args(["--deb-version", v]);
    }
    let output = cmd.output().context("running cargo-deb")?;
    if !output.status.success() {
        bail!(
            "cargo-deb failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // cargo-deb prints the package's path last.
    let said = String::from_utf8_lossy(&output.stdout);
    said.lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .or_else(|| {
            debs_in(out_dir)
                .ok()?
                .into_iter()
                .find(|d| !before.contains(d))
        })
        .with_context(|| format!("cargo-deb named no .deb:\n{said}"))
}

fn debs_in(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect())
}

/// target/tools/bin/cargo-deb, installed there (pinned) when missing.
fn ensure_cargo_deb(root: &Path) -> Result<PathBuf> {
    crate::cargo_install_pinned(
        &root.join("target/tools"),
        "cargo-deb",
        "cargo-deb",
        CARGO_DEB_VERSION,
    )
}

/// target/deb-assets/: units/, man/, completions/.
fn write_assets(root: &Path, binary: &Path) -> Result<()> {
    let dir = root.join("target/deb-assets");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let units = dir.join("units");
    std::fs::create_dir_all(&units)?;
    for unit in UNITS_WITH_PATHS {
        let text = std::fs::read_to_string(root.join("systemd").join(unit))
            .with_context(|| format!("reading systemd/{unit}"))?;
        let packaged = package_paths(&text);
        if packaged.contains("/usr/local") {
            bail!("systemd/{unit} names a /usr/local path the package does not rewrite");
        }
        std::fs::write(units.join(unit), packaged)?;
    }
    sh(Command::new(binary).arg("manpages").arg(dir.join("man")))?;
    let completions = dir.join("completions");
    std::fs::create_dir_all(&completions)?;
    for (shell, file) in [
        ("bash", "vramblk"),
        ("zsh", "_vramblk"),
        ("fish", "vramblk.fish"),
    ] {
        let out = Command::new(binary)
            .args(["completions", shell])
            .output()
            .context("vramblk completions")?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!("vramblk completions {shell} failed");
        }
        std::fs::write(completions.join(file), out.stdout)?;
    }
    Ok(())
}

/// A unit as `cargo xtask install` ships it (/usr/local) turned into the
/// package's (/usr).
fn package_paths(unit: &str) -> String {
    unit.replace("/usr/local/bin/vramblk", "/usr/bin/vramblk")
        .replace("/usr/local/share/doc/vramblk", "/usr/share/doc/vramblk")
}

/// What the package holds, its conffile and its man pages.
fn check(deb: &Path) -> Result<()> {
    let listing = stdout_of(Command::new("dpkg-deb").arg("--contents").arg(deb))?;
    let files: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    let missing: Vec<&&str> = MUST_HOLD.iter().filter(|f| !files.contains(f)).collect();
    if !missing.is_empty() {
        bail!("{} lacks {missing:?}", deb.display());
    }
    let conffiles = stdout_of(
        Command::new("dpkg-deb")
            .arg("--info")
            .arg(deb)
            .arg("conffiles"),
    )?;
    if conffiles.trim() != "/etc/vramblk.toml" {
        bail!("the package's conffiles are {conffiles:?}, not /etc/vramblk.toml alone");
    }
    let scratch = deb.with_extension("check");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)?;
    }
    sh(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&scratch))?;
    let mut pages = 0;
    for section in ["man1", "man5"] {
        for page in std::fs::read_dir(scratch.join("usr/share/man").join(section))? {
            let page = page?.path();
            let out = Command::new("man")
                .args(["--warnings", "-l"])
                .arg(&page)
                .env("MANPAGER", "cat")
                .env("MANWIDTH", "80")
                .output()
                .context("running man (package man-db)")?;
            let warnings = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() || !warnings.trim().is_empty() || out.stdout.len() < 200 {
                bail!(
                    "man -l {} did not render cleanly: {warnings}",
                    page.display()
                );
            }
            pages += 1;
        }
    }
    std::fs::remove_dir_all(&scratch)?;
    println!(
        "PASS package {}: {} files, conffile /etc/vramblk.toml, {pages} man pages render without a warning",
        deb.display(),
        files.len()
    );
    Ok(())
}

fn stdout_of(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packaged_units_name_usr_not_usr_local() {
        let root = crate::root().unwrap();
        for unit in UNITS_WITH_PATHS {
            let text = std::fs::read_to_string(root.join("systemd").join(unit)).unwrap();
            let packaged = package_paths(&text);
            assert!(!packaged.contains("/usr/local"), "{unit}");
            assert!(packaged.contains("/usr/bin/vramblk"), "{unit}");
        }
    }

    #[test]
    fn every_unit_of_systemd_is_packaged_or_rewritten() {
        // A unit added to systemd/ but not to the package would be
        // installed by `cargo xtask install` only.
        let root = crate::root().unwrap();
        let manifest = std::fs::read_to_string(root.join("cli/Cargo.toml")).unwrap();
        for entry in std::fs::read_dir(root.join("systemd")).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            if name.ends_with(".service") || name.ends_with(".timer") {
                let named = manifest.contains(&format!("/{name}\""));
                assert!(named, "{name} is not in cli/Cargo.toml's package assets");
                assert!(
                    MUST_HOLD.iter().any(|f| f.ends_with(&format!("/{name}"))),
                    "{name} is not in MUST_HOLD"
                );
            }
        }
    }
}
