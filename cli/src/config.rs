//! `vramblk config check [PATH]`.

use anyhow::Result;
use std::path::Path;
use vramblk_config::{format_size, Config};

pub fn check(path: &Path) -> Result<()> {
    let c = Config::load(path)?;
    println!("{}: ok, {} device(s)", path.display(), c.devices.len());
    for (i, d) in c.devices.iter().enumerate() {
        println!(
            "  device {i}: {} on {}{}, swap priority {}, {} queues x depth {}",
            format_size(d.size),
            d.backend,
            if d.backend == vramblk_config::Backend::Cuda && d.gpu.single().is_some() {
                format!(" GPU {} (reserve {})", d.gpu, format_size(d.reserve))
            } else if d.backend == vramblk_config::Backend::Cuda {
                format!(
                    " GPUs {}: one device each, the size split by free VRAM (reserve {} each)",
                    d.gpu,
                    format_size(d.reserve)
                )
            } else {
                String::new()
            },
            d.priority,
            d.queues
                .map_or("one per CPU".to_string(), |q| q.to_string()),
            d.depth
        );
    }
    println!(
        "  power: {}; pressure: {}",
        if c.power.enabled { "on" } else { "off" },
        if c.pressure.enabled {
            format!(
                "on, below {} free VRAM",
                format_size(c.pressure.min_free_vram)
            )
        } else {
            "off".into()
        }
    );
    Ok(())
}
