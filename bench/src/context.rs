//! What a standby server's CUDA context costs in VRAM: a second process of
//! this binary (`--context-probe`) opens the GPU's primary context and loads
//! the copy kernel, as a standby does before it imports any VRAM, and the
//! free VRAM is read before it starts and while it waits.

use crate::load::free_vram;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use vramblk_cuda_store::CudaStore;

/// The probe's side: hold a context, say "ready", wait for stdin to close.
pub fn probe(gpu: u32) -> i32 {
    let held = match CudaStore::context_only(gpu) {
        Ok(s) => s,
        Err(e) => {
            println!("error {e}");
            return 1;
        }
    };
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(held);
    0
}

/// VRAM a second context took, measured through `store`'s context; a
/// check line with the figure.
pub fn standby_context_cost(store: &CudaStore, gpu: u32) -> (String, bool) {
    let fail = |why: String| (format!("a standby's CUDA context: {why}"), false);
    let Ok(exe) = std::env::current_exe() else {
        return fail("no path to this binary".into());
    };
    let before = free_vram(store);
    let child = Command::new(exe)
        .args(["--context-probe", "--gpu", &gpu.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return fail(format!("could not start the probe: {e}")),
    };
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    let during = free_vram(store);
    drop(child.stdin.take());
    let _ = child.wait();
    if line.trim() != "ready" {
        return fail(format!("the probe said {:?}", line.trim()));
    }
    let cost = before.saturating_sub(during);
    (
        format!(
            "a standby's CUDA context (primary context + copy kernel, before importing VRAM) takes {} MiB of VRAM ({} MiB free before, {} MiB while it waited)",
            cost >> 20,
            before >> 20,
            during >> 20
        ),
        true,
    )
}
