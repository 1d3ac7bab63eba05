//! Host tools the VM suite needs, installed with apt-get when missing.

use crate::sh;
use anyhow::{bail, Result};
use std::path::Path;
use std::process::Command;

/// (a file that proves it is there, the Debian package that brings it)
const NEEDED: &[(&str, &str)] = &[
    ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
    ("/usr/bin/fio", "fio"),
    ("/bin/busybox", "busybox-static"),
    ("/usr/bin/cpio", "cpio"),
    ("/usr/bin/strip", "binutils"),
    ("/usr/bin/xz", "xz-utils"),
    ("/sbin/mkswap", "util-linux"),
    ("/usr/bin/setpriv", "util-linux"),
    ("/usr/bin/apt-get", "apt"),
    ("/usr/bin/systemd-analyze", "systemd"),
    // The package boot: dpkg, man and the shells whose completions it loads.
    ("/usr/bin/dpkg-deb", "dpkg"),
    ("/bin/tar", "tar"),
    ("/sbin/start-stop-daemon", "dpkg"),
    ("/usr/bin/man", "man-db"),
    ("/usr/bin/groff", "groff-base"),
    ("/usr/bin/col", "bsdextrautils"),
    ("/bin/bash", "bash"),
    ("/usr/bin/zsh", "zsh"),
    ("/usr/bin/fish", "fish"),
];

/// What `cargo xtask bench` needs beyond the suite's tools: the peers
/// (nbdkit's memory plugin and nbd-client for the NBD path) and ioping.
const NEEDED_FOR_BENCH: &[(&str, &str)] = &[
    ("/usr/bin/nbdkit", "nbdkit"),
    ("/sbin/nbd-client", "nbd-client"),
    ("/usr/bin/ioping", "ioping"),
    ("/usr/bin/taskset", "util-linux"),
    ("/bin/dd", "coreutils"),
];

pub fn ensure() -> Result<()> {
    install_missing(NEEDED)
}

pub fn ensure_bench() -> Result<()> {
    install_missing(NEEDED)?;
    install_missing(NEEDED_FOR_BENCH)
}

fn install_missing(needed: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(file, _)| !Path::new(file).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "missing tools ({}) and no apt-get to install them",
            missing.join(" ")
        );
    }
    println!("== installing {}", missing.join(" "));
    sh(Command::new("apt-get").args(["update", "-qq"]))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}
