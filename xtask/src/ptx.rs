//! `cargo xtask ptx`: the GPU kernels written in CUDA C (cuda-store/
//! kernels/*.cu) compiled to the PTX committed beside them, so building
//! vramblk needs no CUDA; `--check` says whether the committed PTX is what
//! the source gives, without writing.
//!
//! The compiler is NVRTC (CUDA C to PTX, what nvcc's front end does) from
//! NVIDIA's PyPI wheel `nvidia-cuda-nvrtc-cu12`, pinned to one version and
//! fetched with pip into target/nvrtc/ (no CUDA toolkit installed, none
//! needed on the machine): PyPI's `nvidia-cuda-nvcc-cu12` wheels carry
//! ptxas and libnvvm but no nvcc. NVRTC 12.2 writes PTX ISA 8.2, which
//! drivers from 535 on compile. cudarc loads libnvrtc at run time, so the
//! compile runs in a child process started with the wheel's library
//! directory on LD_LIBRARY_PATH.
//!
//! Each PTX file starts with a line naming its source and that source's
//! CRC32C; a tidy test holds the committed files to it on every `cargo
//! test`, so a source changed without `cargo xtask ptx` fails the tests
//! even where NVRTC is not at hand.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The NVRTC wheel the committed PTX comes from.
pub const NVRTC_VERSION: &str = "12.2.140";

/// The virtual architecture: sm_70 (Volta) and newer, as the copy kernel;
/// warp-level match (`__match_any_sync`) needs it.
pub const ARCH: &str = "compute_70";

/// The kernels: (source, PTX) relative to the workspace root.
pub const KERNELS: [(&str, &str); 1] = [(
    "cuda-store/kernels/page_lz.cu",
    "cuda-store/kernels/page_lz.ptx",
)];

/// Set in the child that compiles (the wheel's libraries on its path).
const CHILD_ENV: &str = "VRAMBLK_PTX_CHILD";

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Compare the committed PTX with what the sources give; write nothing.
    #[arg(long)]
    check: bool,
}

/// The first line of the PTX made from `source` (its text).
pub fn header(source_path: &str, source: &str) -> String {
    format!(
        "// vramblk: made by `cargo xtask ptx` from {source_path} (crc32c {:08x}) with NVRTC {NVRTC_VERSION}, {ARCH}; do not edit",
        crc32c::crc32c(source.as_bytes())
    )
}

pub fn run(root: &Path, o: &Options) -> Result<()> {
    if std::env::var_os(CHILD_ENV).is_some() {
        return compile_all(root, o);
    }
    let lib = fetch_nvrtc(root)?;
    let exe = std::env::current_exe().context("finding xtask's own binary")?;
    let mut child = Command::new(exe);
    child.arg("ptx");
    if o.check {
        child.arg("--check");
    }
    let path = match std::env::var_os("LD_LIBRARY_PATH") {
        Some(old) => {
            let mut p = lib.clone().into_os_string();
            p.push(":");
            p.push(old);
            p
        }
        None => lib.clone().into_os_string(),
    };
    crate::sh(child.env(CHILD_ENV, "1").env("LD_LIBRARY_PATH", path))
}

/// `cargo xtask test`'s step: the PTX compared with what the sources give
/// (`--check`), or, where NVRTC cannot be fetched (no python3 with pip,
/// PyPI out of reach), a SKIPPED line saying so; the tidy test still holds
/// each PTX to its source's checksum then.
pub fn check_where_possible(root: &Path) -> Result<()> {
    println!("== ptx: the committed PTX against its CUDA C");
    if let Err(e) = fetch_nvrtc(root) {
        println!("SKIPPED: the PTX was not compiled anew: {e:#}");
        return Ok(());
    }
    run(root, &Options { check: true })
}

/// The directory holding libnvrtc.so.12 from the pinned wheel, fetched
/// with pip when it is not there yet.
fn fetch_nvrtc(root: &Path) -> Result<PathBuf> {
    let dir = root.join("target/nvrtc").join(NVRTC_VERSION);
    let lib = dir.join("nvidia/cuda_nvrtc/lib");
    if lib.join("libnvrtc.so.12").exists() {
        return Ok(lib);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    println!("== ptx: fetching NVRTC {NVRTC_VERSION} (PyPI: nvidia-cuda-nvrtc-cu12)");
    crate::sh(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary",
                ":all:",
            ])
            .arg(format!("nvidia-cuda-nvrtc-cu12=={NVRTC_VERSION}"))
            .arg("-d")
            .arg(&dir),
    )
    .context("fetching NVRTC with pip (python3 and pip are needed, and PyPI reachable)")?;
    let wheel = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip left no wheel")?;
    crate::sh(
        Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(&dir),
    )
    .context("unpacking the NVRTC wheel")?;
    if !lib.join("libnvrtc.so.12").exists() {
        bail!(
            "the NVRTC wheel has no {}",
            lib.join("libnvrtc.so.12").display()
        );
    }
    Ok(lib)
}

fn compile_all(root: &Path, o: &Options) -> Result<()> {
    let mut stale = Vec::new();
    for (source_path, ptx_path) in KERNELS {
        let source = std::fs::read_to_string(root.join(source_path))
            .with_context(|| format!("reading {source_path}"))?;
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(ARCH),
            name: Some(source_path.rsplit('/').next().unwrap_or(source_path).into()),
            options: vec!["--std=c++14".into()],
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(&source, opts)
            .map_err(|e| anyhow::anyhow!("compiling {source_path}: {e:?}"))?;
        let text = format!("{}\n{}", header(source_path, &source), ptx.to_src());
        let committed = std::fs::read_to_string(root.join(ptx_path)).unwrap_or_default();
        if committed == text {
            println!("{ptx_path}: up to date");
        } else if o.check {
            stale.push(ptx_path);
        } else {
            std::fs::write(root.join(ptx_path), &text)
                .with_context(|| format!("writing {ptx_path}"))?;
            println!("{ptx_path}: written ({} lines)", text.lines().count());
        }
    }
    if !stale.is_empty() {
        bail!(
            "not what the sources give: {} (run `cargo xtask ptx`)",
            stale.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf()
    }

    #[test]
    fn committed_ptx_comes_from_the_committed_source() {
        for (source_path, ptx_path) in KERNELS {
            let source = std::fs::read_to_string(root().join(source_path)).unwrap();
            let ptx = std::fs::read_to_string(root().join(ptx_path)).unwrap();
            assert_eq!(
                ptx.lines().next(),
                Some(header(source_path, &source).as_str()),
                "{ptx_path} was not made from today's {source_path}: run `cargo xtask ptx`"
            );
        }
    }

    /// The `#define`s of the page kernels (and of the stand-in libcuda's C
    /// port of them) that the Rust reference owns.
    #[test]
    fn the_page_kernels_use_the_reference_constants() {
        for path in [KERNELS[0].0, "cuda-store/tests/stub/libcuda_stub.c"] {
            page_constants_match(path);
        }
    }

    fn page_constants_match(path: &str) {
        let source = std::fs::read_to_string(root().join(path)).unwrap();
        let define = |name: &str| -> usize {
            source
                .lines()
                .find_map(|l| l.strip_prefix(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("{path}: no #define {name}"))
                .trim()
                .parse()
                .unwrap()
        };
        use vramblk_compress::{lz, CLASS_STEP, PAGE};
        assert_eq!(define("PAGE"), PAGE);
        assert_eq!(define("HASH_BITS"), lz::HASH_BITS as usize);
        assert_eq!(define("CHAIN"), lz::CHAIN);
        assert_eq!(define("SEGMENT"), lz::SEGMENT);
        assert_eq!(define("MAX_COMPRESSED"), PAGE - CLASS_STEP);
        assert_eq!(define("MAX_COMPRESSED"), lz::MAX_COMPRESSED);
    }
}
