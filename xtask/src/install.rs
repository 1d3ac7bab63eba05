//! `cargo xtask install` / `uninstall`: the binary, the systemd units, the
//! udev rule, the module list and (when there is none) the default config.
//! Idempotent; `--dry-run` prints what it would do; `--root DIR` installs
//! under DIR (packaging, tests) and touches no running system.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `install` / `uninstall` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Print what would be done, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Stage the files under DIR instead of / (packaging).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Install target/release/vramblk as it is (no cargo build).
    #[arg(long)]
    no_build: bool,
}

/// What goes where: (source in the repository, destination, mode, only
/// when the destination is missing).
struct Item {
    src: &'static str,
    dst: &'static str,
    mode: u32,
    keep_existing: bool,
}

const ITEMS: &[Item] = &[
    Item {
        src: "target/release/vramblk",
        dst: "/usr/local/bin/vramblk",
        mode: 0o755,
        keep_existing: false,
    },
    Item {
        src: "systemd/vramblk.service",
        dst: "/etc/systemd/system/vramblk.service",
        mode: 0o644,
        keep_existing: false,
    },
    Item {
        src: "systemd/vramblk-sleep.service",
        dst: "/etc/systemd/system/vramblk-sleep.service",
        mode: 0o644,
        keep_existing: false,
    },
    Item {
        src: "systemd/vramblk-metrics.service",
        dst: "/etc/systemd/system/vramblk-metrics.service",
        mode: 0o644,
        keep_existing: false,
    },
    Item {
        src: "systemd/vramblk-metrics.timer",
        dst: "/etc/systemd/system/vramblk-metrics.timer",
        mode: 0o644,
        keep_existing: false,
    },
    Item {
        src: "systemd/90-vramblk-power.rules",
        dst: "/etc/udev/rules.d/90-vramblk-power.rules",
        mode: 0o644,
        keep_existing: false,
    },
    Item {
        src: "systemd/vramblk-modules.conf",
        dst: "/etc/modules-load.d/vramblk.conf",
        mode: 0o644,
        keep_existing: false,
    },
    Item {
        src: "docs/operations.md",
        dst: "/usr/local/share/doc/vramblk/operations.md",
        mode: 0o644,
        keep_existing: false,
    },
    Item {
        src: "systemd/vramblk.toml",
        dst: "/etc/vramblk.toml",
        mode: 0o644,
        keep_existing: true,
    },
];

/// Where `dst` lands under the chosen root.
fn place(root: Option<&Path>, dst: &str) -> PathBuf {
    match root {
        Some(r) => r.join(dst.trim_start_matches('/')),
        None => PathBuf::from(dst),
    }
}

/// Whether this is a live system we may reload (systemd running, no --root).
fn live_systemd(o: &Options) -> bool {
    o.root.is_none() && Path::new("/run/systemd/system").exists()
}

fn require_root(o: &Options, what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if o.root.is_none() && !o.dry_run && unsafe { libc::geteuid() } != 0 {
        bail!("{what} writes to /usr/local and /etc: run it as root (sudo -E cargo xtask {what}), or add --dry-run");
    }
    Ok(())
}

pub fn install(repo: &Path, o: &Options) -> Result<()> {
    require_root(o, "install")?;
    let binary = repo.join("target/release/vramblk");
    if o.dry_run {
        println!("would build: cargo build --release -p vramblk-cli");
    } else if o.no_build {
        if !binary.exists() {
            bail!("--no-build: there is no {}", binary.display());
        }
    } else {
        println!("== building vramblk (release)");
        crate::build_release(repo, &["-p", "vramblk-cli"])?;
        if !binary.exists() {
            bail!("the build left no {}", binary.display());
        }
    }
    for item in ITEMS {
        let src = repo.join(item.src);
        let dst = place(o.root.as_deref(), item.dst);
        let verdict = if item.keep_existing && dst.exists() {
            "kept (exists)"
        } else if !o.dry_run && std::fs::read(&dst).ok() == std::fs::read(&src).ok() {
            "unchanged"
        } else if o.dry_run {
            "would install"
        } else {
            copy(&src, &dst, item.mode)?;
            "installed"
        };
        println!("{verdict:>14}  {} -> {}", item.src, dst.display());
    }
    reload(o, &["enable", "vramblk-sleep.service"]);
    println!(
        "next: edit /etc/vramblk.toml (one [[device]] per device), check it with `vramblk config check`, then `systemctl enable --now vramblk`"
    );
    Ok(())
}

pub fn uninstall(o: &Options) -> Result<()> {
    require_root(o, "uninstall")?;
    if live_systemd(o) {
        let cmd = [
            "disable",
            "--now",
            "vramblk.service",
            "vramblk-sleep.service",
        ];
        run_or_say(o, "systemctl", &cmd);
    }
    for item in ITEMS {
        let dst = place(o.root.as_deref(), item.dst);
        if item.keep_existing {
            println!("{:>14}  {} (your configuration)", "kept", dst.display());
            continue;
        }
        let verdict = if !dst.exists() {
            "absent"
        } else if o.dry_run {
            "would remove"
        } else {
            std::fs::remove_file(&dst).with_context(|| format!("removing {}", dst.display()))?;
            "removed"
        };
        println!("{verdict:>14}  {}", dst.display());
    }
    reload(o, &[]);
    Ok(())
}

/// daemon-reload, udev reload, and `systemctl <extra>` when asked, on a
/// live system.
fn reload(o: &Options, extra: &[&str]) {
    if !live_systemd(o) {
        if o.root.is_none() {
            println!("(systemd is not running here: no daemon-reload)");
        }
        return;
    }
    run_or_say(o, "systemctl", &["daemon-reload"]);
    if !extra.is_empty() {
        run_or_say(o, "systemctl", extra);
    }
    run_or_say(o, "udevadm", &["control", "--reload"]);
}

fn run_or_say(o: &Options, program: &str, args: &[&str]) {
    let line = format!("{program} {}", args.join(" "));
    if o.dry_run {
        println!("would run: {line}");
        return;
    }
    match Command::new(program).args(args).status() {
        Ok(s) if s.success() => println!("ran: {line}"),
        Ok(s) => println!("warning: {line} failed ({s})"),
        Err(e) => println!("warning: {line}: {e}"),
    }
}

fn copy(src: &Path, dst: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = dst.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Through a temporary name, so a running binary is replaced, not
    // rewritten in place.
    let tmp = dst.with_extension("vramblk-new");
    std::fs::copy(src, &tmp)
        .with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, dst).with_context(|| format!("installing {}", dst.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_under_a_root_twice_and_uninstalls_keeping_the_config() {
        let repo = crate::root().unwrap();
        let tmp = std::env::temp_dir().join(format!("vramblk-install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        // The binary may not be built in a unit-test run: a stand-in.
        let fake_repo = tmp.join("repo");
        for item in ITEMS {
            let src = fake_repo.join(item.src);
            std::fs::create_dir_all(src.parent().unwrap()).unwrap();
            match std::fs::read(repo.join(item.src)) {
                Ok(b) if item.src.starts_with("systemd/") || item.src.starts_with("docs/") => {
                    std::fs::write(&src, b).unwrap()
                }
                _ => std::fs::write(&src, b"stand-in").unwrap(),
            }
        }
        let root = tmp.join("root");
        let o = Options {
            dry_run: false,
            root: Some(root.clone()),
            no_build: true,
        };
        install(&fake_repo, &o).unwrap();
        let bin = root.join("usr/local/bin/vramblk");
        assert_eq!(std::fs::read(&bin).unwrap(), b"stand-in");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
            0o755
        );
        // Again: idempotent, and an edited config is kept.
        let config = root.join("etc/vramblk.toml");
        std::fs::write(&config, "# mine\n").unwrap();
        install(&fake_repo, &o).unwrap();
        assert_eq!(std::fs::read_to_string(&config).unwrap(), "# mine\n");
        // A dry run changes nothing.
        let dry = Options { dry_run: true, ..o };
        std::fs::remove_file(&bin).unwrap();
        install(&fake_repo, &dry).unwrap();
        assert!(!bin.exists());
        let o = Options {
            dry_run: false,
            ..dry
        };
        let unit = root.join("etc/systemd/system/vramblk.service");
        assert!(std::fs::read_to_string(&unit)
            .unwrap()
            .contains("Type=notify"));
        uninstall(&o).unwrap();
        assert!(!unit.exists());
        assert!(!root.join("usr/local/bin/vramblk").exists());
        assert_eq!(std::fs::read_to_string(&config).unwrap(), "# mine\n");
        // Uninstalling again finds everything absent and is fine.
        uninstall(&o).unwrap();
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn the_shipped_files_exist_and_options_parse() {
        let repo = crate::root().unwrap();
        for item in ITEMS.iter().filter(|i| !i.src.starts_with("target/")) {
            assert!(repo.join(item.src).exists(), "{}", item.src);
        }
        use clap::Parser;
        let a = |v: &[&str]| crate::Cli::try_parse_from(["xtask", "install"].iter().chain(v));
        match a(&["--dry-run"]).unwrap().task {
            crate::Task::Install(o) => assert!(o.dry_run && !o.no_build),
            other => panic!("{other:?}"),
        }
        assert!(a(&["--root"]).is_err());
        assert!(a(&["--yes"]).is_err());
    }
}
