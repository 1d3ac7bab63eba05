//! `vramblk release [ID]`: give VRAM back by hand, as the pressure policy
//! does: swap off and remove cuda devices, unless RAM cannot take their
//! pages back.

use crate::del::{delete_each, lock, vramblk_records};
use crate::host::{require_driver, require_root};
use anyhow::{bail, Result};
use std::path::Path;
use vramblk_config::{Backend, RUN_DIR};

pub fn run(id: Option<u32>) -> Result<()> {
    require_root("release")?;
    require_driver()?;
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
    let kept = delete_each(run_dir, &ids);
    if kept > 0 {
        bail!("{kept} device(s) kept their VRAM");
    }
    Ok(())
}
