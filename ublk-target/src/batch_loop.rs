//! The queue loop over batch commands (batch_io.rs), for devices the
//! kernel gave UBLK_F_BATCH_IO: each turn commits every result the store
//! finished in one COMMIT, takes every tag the FETCH delivered, and hands
//! the new requests to the same engine the per-tag loop feeds. No task per
//! tag: the tags arrive as a list, and their results leave as one.

use crate::batch_io::{BatchError, BatchQueue};
use crate::engine::QueueEngine;
use crate::request;
use crate::ring_wait;
use libublk::io::{with_task_io_ring_mut, UblkQueue};
use std::time::Instant;
use vramblk_store::{IoBuf, QueueStore};

/// Serves the queue until the kernel ends its FETCH (the device stopped,
/// deleted or quiesced), every request it delivered is answered and what
/// the queue sent has completed. `batch` is started (batch_io.rs);
/// `bufs[t]` is tag t's io buffer.
pub(crate) fn serve<Q: QueueStore>(
    q: &UblkQueue<'_>,
    engine: &mut QueueEngine<Q>,
    batch: &mut BatchQueue,
    bufs: &[IoBuf],
) -> Result<(), String> {
    let depth = bufs.len();
    let mut results: Vec<(u16, i32)> = Vec::with_capacity(depth);
    let mut cqes = Vec::with_capacity(2 * depth);
    let mut last_progress = Instant::now();
    let fail = |e: BatchError| e.to_string();
    loop {
        batch.commit(q, &results).map_err(fail)?;
        results.clear();
        // Every request the kernel delivered is answered before the queue
        // ends: a quiesce (an upgrade's hand-over) ends the FETCH while the
        // store still holds requests, and the kernel waits for their
        // results; a server that left them would fail them.
        if batch.finished() && !engine.has_work() {
            return Ok(());
        }
        let busy = engine.in_flight() > 0;
        with_task_io_ring_mut(|r| {
            ring_wait::turn(r, busy, last_progress.elapsed())?;
            cqes.extend(r.completion());
            Ok::<_, libublk::UblkError>(())
        })
        .map_err(|e| format!("the ring: {e}"))?;
        for cqe in cqes.drain(..) {
            batch
                .handle(q, &cqe, |tag| {
                    let buf = bufs[tag as usize];
                    match request::from_iod(tag, q.get_iod(tag), buf) {
                        Ok(req) => engine.enqueue(req),
                        Err(errno) => results.push((tag, errno)),
                    }
                })
                .map_err(fail)?;
        }
        // The store: submit what arrived as one round, take what finished.
        while engine.has_work() {
            if engine.pump(|c| results.push((c.tag, c.result))) > 0 {
                last_progress = Instant::now();
            } else {
                // In flight on the store and nothing finished yet: let the
                // ring be polled rather than spin here.
                break;
            }
        }
    }
}
