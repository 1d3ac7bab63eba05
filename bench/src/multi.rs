//! `engine-bench --gpu all` (issue 21): every GPU driven at once, each
//! with its own store and queues, beside each GPU alone in the same
//! process: per-GPU and aggregate IOPS and GB/s, and whether the aggregate
//! reaches 0.9x the sum of the GPUs alone.

use crate::load::{gpu_shape, GPU_SHAPES};
use crate::table::Row;
use vramblk_cuda_store::CudaStore;

/// Aggregate against the GPUs alone, and each GPU together against alone.
const TARGET: f64 = 0.9;

/// The table, as markdown; each shape timed `secs` on each GPU alone, then
/// on all of them at once.
pub fn table(stores: &[(u32, CudaStore)], secs: f64) -> String {
    let mut out = String::from(
        "| shape | GPU | alone | together | together / alone |\n| --- | --- | --- | --- | --- |\n",
    );
    let mut summary = String::from(
        "| shape | GPUs | sum alone | all at once | ratio | target | met |\n| --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for shape in 0..GPU_SHAPES {
        let alone: Vec<Row> = stores
            .iter()
            .map(|(_, s)| gpu_shape(s, shape, secs))
            .collect();
        let together: Vec<Row> = std::thread::scope(|sc| {
            let hs: Vec<_> = stores
                .iter()
                .map(|(_, s)| sc.spawn(move || gpu_shape(s, shape, secs)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("a GPU's load"))
                .collect()
        });
        let name = format!("{} {} x {}", alone[0].name, alone[0].queues, alone[0].depth);
        let fig = |r: &Row| figure(r);
        for (((gpu, _), a), t) in stores.iter().zip(&alone).zip(&together) {
            out += &format!(
                "| {name} | {gpu} | {} | {} | {:.2}x |\n",
                fig(a),
                fig(t),
                ratio(t, a)
            );
        }
        let sum = |rows: &[Row]| Row {
            iops: rows.iter().map(|r| r.iops).sum(),
            gbps: rows.iter().map(|r| r.gbps).sum(),
            errors: rows.iter().map(|r| r.errors).sum(),
            ..rows[0].clone()
        };
        let (a, t) = (sum(&alone), sum(&together));
        let r = ratio(&t, &a);
        let each_ok = together
            .iter()
            .zip(&alone)
            .all(|(t, a)| ratio(t, a) >= TARGET);
        summary += &format!(
            "| {name} | {} | {} | {} | {r:.2}x | >= {TARGET}x, each GPU >= {TARGET}x alone | {} |\n",
            stores.len(),
            fig(&a),
            fig(&t),
            if r >= TARGET && each_ok && t.errors == 0 {
                "yes"
            } else {
                "no"
            }
        );
    }
    format!("{summary}\n{out}")
}

/// IOPS for 4 KiB, GB/s for larger blocks.
fn figure(r: &Row) -> String {
    if r.bs <= 4096 {
        format!("{:.2} M IOPS", r.iops / 1e6)
    } else {
        format!("{:.1} GB/s", r.gbps)
    }
}

fn ratio(a: &Row, b: &Row) -> f64 {
    if b.iops > 0.0 {
        a.iops / b.iops
    } else {
        0.0
    }
}
