//! `vramblk release [ID] [--to SIZE]`: give VRAM back by hand, as the
//! pressure policy does: the unused part of each device while it keeps
//! serving (--to), or whole devices (swap off and remove) unless RAM cannot
//! take their pages back.

use crate::del::{delete_each, lock, vramblk_records};
use anyhow::{bail, Context, Result};
use std::path::Path;
use vramblk_config::{format_size, parse_size_or_zero, Backend, RUN_DIR};
use vramblk_daemon::host::{require_driver, require_root};
use vramblk_daemon::vram_control::{self, Command, VramReply};

pub fn run(id: Option<u32>, to: Option<&str>) -> Result<()> {
    require_root("release")?;
    require_driver()?;
    let to = to
        .map(|t| parse_size_or_zero(t).with_context(|| format!("--to {t}")))
        .transpose()?;
    let run_dir = Path::new(RUN_DIR);
    let _lock = lock(run_dir)?;
    let cuda: Vec<u32> = vramblk_records(run_dir)
        .into_iter()
        .filter(|r| r.backend == Backend::Cuda)
        .map(|r| r.id)
        .collect();
    let ids = match id {
        Some(i) if cuda.contains(&i) => vec![i],
        Some(i) => bail!("ublk device {i} is not a vramblk cuda device: it holds no VRAM"),
        None if cuda.is_empty() => {
            println!("no cuda devices: no VRAM to give back");
            return Ok(());
        }
        None => cuda,
    };
    if let Some(to) = to {
        return give_back_unused(run_dir, &ids, to);
    }
    let kept = delete_each(run_dir, &ids);
    if kept > 0 {
        bail!("{kept} device(s) kept their VRAM");
    }
    Ok(())
}

/// Each device holds at most `to` bytes of VRAM, or what its data needs.
fn give_back_unused(run_dir: &Path, ids: &[u32], to: u64) -> Result<()> {
    let mut failed = 0;
    for &id in ids {
        // Taking back later keeps the device's own reserve free (the
        // service names its pressure threshold instead).
        match give_back(run_dir, id, to, 0) {
            Ok(r) => println!("/dev/ublkb{id}: {}", describe_give_back(&r)),
            Err(e) => {
                eprintln!("/dev/ublkb{id}: {e:#}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} device(s) gave nothing back");
    }
    Ok(())
}

/// Asks device `id`'s server to hold at most `to` bytes; the reply, or
/// why it could not.
pub fn give_back(run_dir: &Path, id: u32, to: u64, floor: u64) -> Result<VramReply> {
    let r = vram_control::request(run_dir, id, Command::GiveBack { to, floor })?;
    if let Some(e) = &r.error {
        bail!("{e}");
    }
    Ok(r)
}

pub fn describe_give_back(r: &VramReply) -> String {
    let compacted = if r.blocks_moved > 0 {
        format!(
            ", {} compressed blocks packed tighter first",
            r.blocks_moved
        )
    } else {
        String::new()
    };
    format!(
        "holds {} of VRAM ({} of it data, {} when whole; {} extents moved{compacted})",
        format_size(r.held),
        format_size(r.used),
        format_size(r.full),
        r.moved
    )
}
