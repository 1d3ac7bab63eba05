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
    ("/usr/bin/xz", "xz-utils"),
    ("/sbin/mkswap", "util-linux"),
    ("/usr/bin/setpriv", "util-linux"),
    ("/usr/bin/apt-get", "apt"),
];

pub fn ensure() -> Result<()> {
    let missing: Vec<&str> = NEEDED
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
