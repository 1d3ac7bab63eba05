//! The guest kernel: Debian's cloud kernel of one series (6.12 unless
//! `VRAMBLK_VM_KERNEL` names another), the newest build of that series the
//! archive has, resolved when first fetched and cached under
//! target/vm/kernel-SERIES. Debian drops older builds of a series from its
//! archive, so no exact version is written down anywhere.
//!
//! The packages come through a private apt configuration under
//! target/vm/apt (its own sources list, package lists and cache), built from
//! the archive addresses the host's own apt sources use, with the suites
//! each series needs: the host's apt configuration is never touched.

use crate::sh;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

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

/// One kernel series and where Debian keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Series {
    /// What `VRAMBLK_VM_KERNEL` says: "6.12".
    pub name: &'static str,
    /// (archive, suite): "main" is the host's Debian archive, "security"
    /// its security archive.
    suites: &'static [(Archive, &'static str)],
    /// Package names with `{v}` for the build's version, the first one
    /// holding the kernel image; together they hold the image and modules.
    packages: &'static [&'static str],
    /// What `{v}` starts with, before the build number.
    version_prefix: &'static str,
    /// What follows the build number in `{v}`.
    version_suffix: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Archive {
    Main,
    Security,
}

pub const SERIES: &[Series] = &[
    Series {
        name: "6.12",
        suites: &[
            (Archive::Security, "bookworm-security"),
            (Archive::Main, "bookworm-backports"),
        ],
        packages: &["linux-image-{v}-cloud-amd64-unsigned"],
        version_prefix: "6.12.",
        version_suffix: "+deb12",
    },
    Series {
        name: "7.3",
        suites: &[(Archive::Main, "trixie-backports")],
        packages: &[
            "linux-binary-unsigned-{v}-cloud-amd64",
            "linux-modules-{v}-cloud-amd64",
        ],
        version_prefix: "7.3.",
        version_suffix: "+deb13",
    },
    Series {
        name: "6.1",
        suites: &[
            (Archive::Main, "bookworm"),
            (Archive::Security, "bookworm-security"),
        ],
        packages: &["linux-image-{v}-cloud-amd64-unsigned"],
        version_prefix: "6.1.0-",
        version_suffix: "",
    },
];

/// The series the README's test command boots when nothing is named.
pub const DEFAULT_SERIES: &str = "6.12";

impl Series {
    /// The series `VRAMBLK_VM_KERNEL` names, or the default.
    pub fn from_env() -> Result<Series> {
        let want = std::env::var("VRAMBLK_VM_KERNEL").unwrap_or_else(|_| DEFAULT_SERIES.into());
        Series::named(&want)
    }

    pub fn named(want: &str) -> Result<Series> {
        SERIES
            .iter()
            .copied()
            .find(|s| s.name == want)
            .with_context(|| {
                format!(
                    "VRAMBLK_VM_KERNEL={want}: no such series (one of: {})",
                    SERIES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                )
            })
    }

    /// The build number in a package name of this series, if it is one.
    fn build_of(&self, package: &str) -> Option<(u32, String)> {
        let (head, tail) = self.packages[0].split_once("{v}")?;
        let v = package.strip_prefix(head)?.strip_suffix(tail)?;
        let n = v
            .strip_prefix(self.version_prefix)?
            .strip_suffix(self.version_suffix)?;
        let n: u32 = n.parse().ok()?;
        Some((n, v.to_string()))
    }

    /// The newest build's version among `packages` (apt's package names).
    pub fn newest<'a>(&self, packages: impl IntoIterator<Item = &'a str>) -> Option<String> {
        packages
            .into_iter()
            .filter_map(|p| self.build_of(p.trim()))
            .max_by_key(|(n, _)| *n)
            .map(|(_, v)| v)
    }
}

pub struct Kernel {
    /// e.g. "6.12.107+deb12-cloud-amd64"
    pub release: String,
    pub vmlinuz: PathBuf,
    /// The build's /boot/config-RELEASE, where the packages ship one (a
    /// guest gets it where a Debian system has it: vramblk reads it to tell
    /// a kernel built without ublk from a module not loaded).
    pub config: Option<PathBuf>,
    /// Decompressed modules the initramfs loads, by file name.
    pub modules: Vec<PathBuf>,
}

/// The kernel of `VRAMBLK_VM_KERNEL`'s series, fetched into `vm_dir`
/// unless it already is.
pub fn fetch(vm_dir: &Path) -> Result<Kernel> {
    fetch_series(vm_dir, Series::from_env()?)
}

/// The newest build of `series`, fetched into `vm_dir` unless it already is.
pub fn fetch_series(vm_dir: &Path, series: Series) -> Result<Kernel> {
    let cache = vm_dir.join(format!("kernel-{}", series.name));
    let tree = cache.join("tree");
    let release_file = cache.join("release");
    let release = match std::fs::read_to_string(&release_file) {
        Ok(r) if layout(&tree, r.trim()).is_ok() => r.trim().to_string(),
        _ => {
            if cache.exists() {
                std::fs::remove_dir_all(&cache)?;
            }
            std::fs::create_dir_all(&cache)?;
            let apt = PrivateApt::new(&vm_dir.join("apt"), &series)?;
            let version = apt.newest(&series)?;
            println!(
                "== fetching Debian's {} cloud kernel {version}",
                series.name
            );
            for p in series.packages {
                apt.download(&p.replace("{v}", &version), &cache)?;
            }
            for deb in std::fs::read_dir(&cache)?.flatten().map(|e| e.path()) {
                if deb.extension().is_some_and(|x| x == "deb") {
                    sh(Command::new("dpkg").arg("-x").arg(&deb).arg(&tree))?;
                }
            }
            let release = format!("{version}-cloud-amd64");
            std::fs::write(&release_file, &release)?;
            release
        }
    };
    let (vmlinuz, kdir) = layout(&tree, &release)?;
    let mut modules = Vec::new();
    for rel in MODULES {
        let name = Path::new(rel)
            .file_name()
            .and_then(|n| n.to_str())
            .context("module without a name")?;
        let ko = cache.join(format!("{name}.ko"));
        if !ko.exists() {
            match module_bytes(&kdir, rel)? {
                Some(bytes) => std::fs::write(&ko, bytes)?,
                // Built in (7.x builds zsmalloc and lz4 in), or not built
                // at all (Debian 12's 6.1 has no ublk): the guest's insmod
                // of it fails and says so.
                None => {
                    println!("== {release} has no module {rel} (built in, or not built)");
                    continue;
                }
            }
        }
        modules.push(ko);
    }
    let config = Some(tree.join(format!("boot/config-{release}"))).filter(|c| c.exists());
    Ok(Kernel {
        release,
        vmlinuz,
        config,
        modules,
    })
}

/// Where the unpacked packages keep the kernel image and the modules: in
/// /boot and /lib/modules up to Debian 12, in /usr/lib/modules/RELEASE
/// (image beside the modules) in the 7.x packages.
fn layout(tree: &Path, release: &str) -> Result<(PathBuf, PathBuf)> {
    let candidates = [
        (
            tree.join(format!("boot/vmlinuz-{release}")),
            tree.join(format!("lib/modules/{release}/kernel")),
        ),
        (
            tree.join(format!("usr/lib/modules/{release}/vmlinuz.unsigned")),
            tree.join(format!("usr/lib/modules/{release}/kernel")),
        ),
        (
            tree.join(format!("usr/lib/modules/{release}/vmlinuz")),
            tree.join(format!("usr/lib/modules/{release}/kernel")),
        ),
    ];
    candidates
        .into_iter()
        .find(|(image, _)| image.exists())
        .with_context(|| format!("no kernel image for {release} in {}", tree.display()))
}

/// A module of the tree, decompressed (Debian ships them xz- or
/// zstd-compressed, depending on the release); None if the tree lacks it.
fn module_bytes(kdir: &Path, rel: &str) -> Result<Option<Vec<u8>>> {
    let plain = kdir.join(format!("{rel}.ko"));
    if plain.exists() {
        return Ok(Some(std::fs::read(plain)?));
    }
    for (ext, tool) in [("xz", "xz"), ("zst", "zstd")] {
        let packed = kdir.join(format!("{rel}.ko.{ext}"));
        if packed.exists() {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(&packed)
                .output()
                .with_context(|| format!("running {tool}"))?;
            if !out.status.success() {
                bail!("{tool} -dc {} failed", packed.display());
            }
            return Ok(Some(out.stdout));
        }
    }
    Ok(None)
}

/// apt with a sources list, package lists and cache of its own.
struct PrivateApt {
    options: Vec<String>,
}

impl PrivateApt {
    /// Writes `dir`/sources.list for `series` (the host's archive
    /// addresses, this series' suites) and updates its lists.
    fn new(dir: &Path, series: &Series) -> Result<PrivateApt> {
        let lists = dir.join("lists");
        let cache = dir.join("cache");
        std::fs::create_dir_all(lists.join("partial"))?;
        std::fs::create_dir_all(cache.join("archives/partial"))?;
        let hosts = host_archives()?;
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let mut list = String::new();
        for (archive, suite) in series.suites {
            let uri = match archive {
                Archive::Main => &hosts.main,
                Archive::Security => &hosts.security,
            };
            list.push_str(&format!("deb [signed-by={keyring}] {uri} {suite} main\n"));
        }
        let sources = dir.join(format!("sources-{}.list", series.name));
        std::fs::write(&sources, list)?;
        let options = vec![
            format!("Dir::Etc::SourceList={}", sources.display()),
            "Dir::Etc::SourceParts=/nonexistent".to_string(),
            format!("Dir::State::Lists={}", lists.display()),
            format!("Dir::Cache={}", cache.display()),
            "Dir::Cache::pkgcache=".to_string(),
            "Dir::Cache::srcpkgcache=".to_string(),
            "APT::Get::List-Cleanup=false".to_string(),
            // Downloads land in target/, which apt's own user cannot write.
            "APT::Sandbox::User=root".to_string(),
        ];
        let apt = PrivateApt { options };
        println!("== apt-get update (private, {})", sources.display());
        sh(apt.command("apt-get").args(["update", "-qq"]))?;
        Ok(apt)
    }

    fn command(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        for o in &self.options {
            c.arg("-o").arg(o);
        }
        c
    }

    fn newest(&self, series: &Series) -> Result<String> {
        let head = series.packages[0]
            .split_once("{v}")
            .map(|(h, _)| h)
            .unwrap_or_default();
        let out = self
            .command("apt-cache")
            .args(["pkgnames", head])
            .output()
            .context("running apt-cache pkgnames")?;
        let names = String::from_utf8_lossy(&out.stdout);
        series.newest(names.lines()).with_context(|| {
            format!(
                "the archive has no {} cloud kernel (no package like {})",
                series.name, series.packages[0]
            )
        })
    }

    fn download(&self, package: &str, into: &Path) -> Result<()> {
        sh(self
            .command("apt-get")
            .arg("download")
            .arg(package)
            .current_dir(into))
    }
}

/// The Debian archive addresses the host's apt sources use.
struct HostArchives {
    main: String,
    security: String,
}

fn host_archives() -> Result<HostArchives> {
    let mut text = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in dir.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "sources" || x == "list") {
                text.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
                text.push('\n');
            }
        }
    }
    archives_in(&text).context(
        "no Debian archive in the host's apt sources (/etc/apt/sources.list, \
         /etc/apt/sources.list.d): the VM kernel is fetched from the archive they name",
    )
}

/// The main and security archive URIs in apt sources text (one-line and
/// deb822 formats): the URI of an entry whose suite ends in "-security" is
/// the security archive, any other Debian suite's is the main one.
fn archives_in(text: &str) -> Option<HostArchives> {
    let mut entries: Vec<(String, Vec<String>)> = Vec::new();
    let mut uri: Option<String> = None;
    let mut suites: Vec<String> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() {
            if let Some(u) = uri.take() {
                entries.push((u, std::mem::take(&mut suites)));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("deb ") {
            // Options in brackets come before the URI.
            let rest = match rest.trim_start().strip_prefix('[') {
                Some(opts) => opts.split_once(']').map_or("", |(_, after)| after),
                None => rest,
            };
            let words: Vec<&str> = rest.split_whitespace().collect();
            if let [u, s, ..] = words[..] {
                entries.push((u.to_string(), vec![s.to_string()]));
            }
        } else if let Some(u) = line.strip_prefix("URIs:") {
            uri = u.split_whitespace().next().map(str::to_string);
        } else if let Some(s) = line.strip_prefix("Suites:") {
            suites = s.split_whitespace().map(str::to_string).collect();
        }
    }
    if let Some(u) = uri {
        entries.push((u, suites));
    }
    let debian = ["bookworm", "trixie", "forky", "sid", "stable", "testing"];
    let is_debian = |s: &str| debian.iter().any(|d| s.starts_with(d));
    let main = entries
        .iter()
        .find(|(_, s)| s.iter().any(|x| is_debian(x) && !x.ends_with("-security")))?
        .0
        .clone();
    let security = entries
        .iter()
        .find(|(_, s)| s.iter().any(|x| is_debian(x) && x.ends_with("-security")))
        .map(|(u, _)| u.clone())?;
    Some(HostArchives { main, security })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_build_of_a_series_wins_and_other_series_are_ignored() {
        let names = [
            "linux-image-6.12.100+deb12-cloud-amd64-unsigned",
            "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
            "linux-image-6.12.99+deb12-cloud-amd64-unsigned",
            "linux-image-6.12.117+deb12-amd64-unsigned",
            "linux-image-6.1.0-40-cloud-amd64-unsigned",
            "linux-image-6.120.1+deb12-cloud-amd64-unsigned",
            "linux-image-cloud-amd64",
        ];
        let s612 = Series::named("6.12").unwrap();
        assert_eq!(s612.newest(names).as_deref(), Some("6.12.117+deb12"));
        let s61 = Series::named("6.1").unwrap();
        assert_eq!(s61.newest(names).as_deref(), Some("6.1.0-40"));
        let s73 = Series::named("7.3").unwrap();
        assert_eq!(s73.newest(names), None);
        let names73 = [
            "linux-binary-unsigned-7.3.4+deb13-cloud-amd64",
            "linux-binary-unsigned-7.3.2+deb13-cloud-amd64",
            "linux-binary-unsigned-7.2.13+deb13-cloud-amd64",
        ];
        assert_eq!(s73.newest(names73).as_deref(), Some("7.3.4+deb13"));
        assert!(Series::named("5.10").is_err());
    }

    #[test]
    fn the_host_archives_come_from_either_sources_format() {
        let deb822 = "Types: deb\n# a comment\nURIs: http://mirror.example/debian\n\
                      Suites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://mirror.example/debian-security\n\
                      Suites: bookworm-security\nComponents: main\n";
        let a = archives_in(deb822).unwrap();
        assert_eq!(a.main, "http://mirror.example/debian");
        assert_eq!(a.security, "http://mirror.example/debian-security");
        let one_line = "deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian trixie main\n\
                        deb http://m.example/sec trixie-security main\n\
                        deb https://other.example/apt cloud-sdk main\n";
        let a = archives_in(one_line).unwrap();
        assert_eq!(a.main, "http://m.example/debian");
        assert_eq!(a.security, "http://m.example/sec");
        assert!(archives_in("deb https://other.example/apt cloud-sdk main\n").is_none());
    }
}
