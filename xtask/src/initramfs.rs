//! A busybox initramfs holding the binaries under test, their shared
//! libraries, the kernel modules, and the suite scripts.

use crate::sh;
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct Spec<'a> {
    /// Host binaries copied to the same path in the guest, with their libs.
    pub host_bins: &'a [&'a str],
    /// Built binaries copied to /usr/local/bin.
    pub built_bins: &'a [PathBuf],
    pub modules: &'a [PathBuf],
    /// (guest path, contents, executable)
    pub files: &'a [(&'a str, &'a str)],
    /// Host files copied to a guest path: (host path, guest path).
    pub copies: &'a [(PathBuf, &'a str)],
}

pub fn build(stage: &Path, out: &Path, spec: &Spec) -> Result<()> {
    if stage.exists() {
        std::fs::remove_dir_all(stage)?;
    }
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "usr/local/bin",
        "lib/modules",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "etc",
        "root",
    ] {
        std::fs::create_dir_all(stage.join(d))?;
    }
    std::fs::copy("/bin/busybox", stage.join("bin/busybox"))?;
    let applets = Command::new("/bin/busybox").arg("--list").output()?;
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        let link = stage.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    let mut libs = BTreeSet::new();
    for bin in spec.host_bins {
        let real = std::fs::canonicalize(bin).with_context(|| format!("{bin} is not installed"))?;
        copy_into(stage, &real, Path::new(bin))?;
        // A host tool shadows busybox's applet of the same name (dpkg-deb,
        // tar): a program that runs it by name through PATH (dpkg runs
        // dpkg-deb and tar) gets the real one. busybox's own shell still
        // prefers its applets: the suites call those tools by path.
        if let Some(name) = Path::new(bin).file_name() {
            let applet = stage.join("bin").join(name);
            if Path::new(bin) != Path::new("/bin").join(name) && applet.is_symlink() {
                std::fs::remove_file(&applet)?;
            }
        }
        libs.extend(shared_libs(&real)?);
    }
    for bin in spec.built_bins {
        let name = bin.file_name().context("binary without a name")?;
        // Without their line tables: the guest's RAM is small (the swap
        // boots leave a few hundred MiB outside the huge page pool), and
        // they would take tens of MiB of it in the ramfs root. The symbols
        // stay (about 1.4 MiB), so a daemon's panic backtrace names its
        // functions.
        let dst = stage.join("usr/local/bin").join(name);
        sh(Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&dst)
            .arg(bin))?;
        libs.extend(shared_libs(bin)?);
    }
    for lib in libs {
        let real = std::fs::canonicalize(&lib)?;
        copy_into(stage, &real, &lib)?;
    }
    for m in spec.modules {
        std::fs::copy(
            m,
            stage
                .join("lib/modules")
                .join(m.file_name().context("module name")?),
        )?;
    }
    for (src, guest) in spec.copies {
        copy_into(stage, src, Path::new(guest))?;
    }
    for (path, text) in spec.files {
        let dst = stage.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(dst.parent().context("file without a parent")?)?;
        std::fs::write(&dst, text)?;
        // Scripts run; configuration (units under /etc) must not be
        // executable, or systemd says so.
        let mode = if path.starts_with("/etc/") {
            0o644
        } else {
            0o755
        };
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))?;
    }
    std::fs::write(
        stage.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    std::fs::write(stage.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    pack(stage, out)
}

/// Copies `src` to `guest` inside the stage, keeping the mode.
fn copy_into(stage: &Path, src: &Path, guest: &Path) -> Result<()> {
    let dst = stage.join(guest.strip_prefix("/").unwrap_or(guest));
    if dst.exists() && !dst.is_symlink() {
        return Ok(());
    }
    if dst.is_symlink() {
        std::fs::remove_file(&dst)?;
    }
    std::fs::create_dir_all(dst.parent().context("no parent")?)?;
    std::fs::copy(src, &dst).with_context(|| format!("copying {}", src.display()))?;
    Ok(())
}

/// The shared libraries `bin` loads, as ldd reports them (the loader too).
fn shared_libs(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect())
}

fn pack(stage: &Path, out: &Path) -> Result<()> {
    let list = Command::new("find")
        .arg(".")
        .current_dir(stage)
        .stdout(Stdio::piped())
        .spawn()?
        .wait_with_output()?;
    let mut cpio = Command::new("cpio")
        .args(["--quiet", "-o", "-H", "newc", "-O"])
        .arg(out)
        .current_dir(stage)
        .stdin(Stdio::piped())
        .spawn()?;
    use std::io::Write;
    cpio.stdin
        .as_mut()
        .context("cpio stdin")?
        .write_all(&list.stdout)?;
    let status = cpio.wait()?;
    if !status.success() {
        bail!("cpio failed");
    }
    let _ = sh;
    Ok(())
}
