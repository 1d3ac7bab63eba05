//! The queue loop: one thread per queue, one smol task per tag, and one
//! event loop that batches every request of a round into a single store
//! submission. Every backend runs this same loop.

use crate::batch_io::BatchQueue;
use crate::batch_loop;
use crate::counters::DeviceCounters;
use crate::engine::{round_limit, QueueEngine};
use crate::gate::StartGate;
use crate::request;
use crate::ring_wait;
use crate::slots::TagSlots;
use libublk::io::{with_task_io_ring_mut, UblkDev, UblkQueue};
use libublk::uring_async::{
    run_uring_tasks, ublk_reap_io_events_with_update_queue, ublk_wake_task,
};
use libublk::{sys, BufDesc, UblkError};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vramblk_store::{BufferRegion, IoBuf, QueueStore, Store};

/// Serves queue `qid` until the device stops. Errors are logged: a queue
/// thread has nobody to return them to, and the device fails its I/O.
pub(crate) fn serve_queue<S: Store>(
    qid: u16,
    dev: &UblkDev,
    store: &S,
    buffers: Option<&BufferRegion>,
    counters: Arc<DeviceCounters>,
    gate: &StartGate,
) {
    let mut announced = false;
    let result = try_serve_queue(qid, dev, store, buffers, counters, gate, &mut announced);
    if let Err(e) = result {
        log::error!("queue {qid}: {e}");
        if !announced {
            // start_dev waits for every queue to announce itself; reporting
            // this queue as failed lets it return an error instead of hanging.
            dev.notify_buffer_registration_complete(true);
        }
    }
    log::debug!("queue {qid}: stopped");
}

/// How long a queue keeps retrying its ring and store handle when the
/// kernel or the store refuses them (memory short while a recovery waits),
/// and how often.
const SETUP_PATIENCE: Duration = Duration::from_secs(3);
const SETUP_RETRY: Duration = Duration::from_millis(50);

/// Runs `make` until it succeeds or SETUP_PATIENCE has passed, logging the
/// first failure: a recovering server that gave up here would leave the
/// device to a successor that may find it broken (gate.rs says why).
fn with_patience<T>(
    what: &str,
    qid: u16,
    mut make: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let until = Instant::now() + SETUP_PATIENCE;
    let mut logged = false;
    loop {
        match make() {
            Ok(t) => return Ok(t),
            Err(e) if Instant::now() < until => {
                if !logged {
                    log::warn!(
                        "queue {qid}: {what}: {e}; trying again for up to {} s",
                        SETUP_PATIENCE.as_secs()
                    );
                    logged = true;
                }
                std::thread::sleep(SETUP_RETRY);
            }
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
}

fn try_serve_queue<S: Store>(
    qid: u16,
    dev: &UblkDev,
    store: &S,
    buffers: Option<&BufferRegion>,
    counters: Arc<DeviceCounters>,
    gate: &StartGate,
    announced: &mut bool,
) -> Result<(), String> {
    // Everything that can fail happens before the gate; a queue that
    // fails still arrives there, so that no queue fetches.
    let setup = (|| {
        let buffers =
            buffers.ok_or_else(|| format!("no io buffers were set aside for queue {qid}"))?;
        let depth = dev.dev_info.queue_depth as usize;
        let max_io = dev.dev_info.max_io_buf_bytes as usize;
        if buffers.count() < depth || buffers.slot_len() < max_io {
            return Err(format!(
                "the io buffers ({} x {} bytes) do not fit the device ({depth} x {max_io})",
                buffers.count(),
                buffers.slot_len()
            ));
        }
        let bufs = (0..depth)
            .map(|tag| {
                buffers
                    .slot(tag)
                    .ok_or_else(|| format!("no io buffer for tag {tag}"))
            })
            .collect::<Result<Vec<IoBuf>, String>>()?;
        let qstore = with_patience("opening the store", qid, || {
            store.open_queue(qid, buffers).map_err(|e| e.to_string())
        })?;
        let q = with_patience("creating the queue", qid, || {
            UblkQueue::new(qid, dev).map_err(|e| e.to_string())
        })?;
        Ok((buffers, bufs, qstore, Rc::new(q)))
    })();
    let (buffers, bufs, qstore, q) = match setup {
        Ok(s) => s,
        Err(e) => {
            gate.arrive(false);
            return Err(e);
        }
    };
    let depth = bufs.len();
    let engine = QueueEngine::new(qstore, store.size(), depth)
        .with_max_round(round_limit(dev.dev_info.nr_hw_queues as usize, depth))
        .with_counters(counters, qid);
    if dev.dev_info.flags & sys::UBLK_F_BATCH_IO as u64 != 0 {
        return serve_batched(qid, dev, &q, engine, buffers, &bufs, gate, announced);
    }
    let engine = Rc::new(RefCell::new(engine));
    let slots = TagSlots::new(depth);
    let exe = Rc::new(smol::LocalExecutor::new());

    // The tasks submit their FETCH commands when the executor first runs
    // them, below, after the gate.
    let mut tasks = Vec::with_capacity(depth);
    for (tag, buf) in q.tags().zip(bufs) {
        let (q, engine, slots) = (q.clone(), engine.clone(), slots.clone());
        tasks.push(exe.spawn(async move {
            match serve_tag(&q, &engine, &slots, tag, buf).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => log::error!("queue {qid} tag {tag}: {e}"),
            }
        }));
    }
    crate::test_hooks::die_before_fetch_if_asked(qid);
    pass_gate(gate)?;
    announce(qid, dev, announced, tasks.len(), "per-tag", buffers);

    let exe2 = exe.clone();
    let result = smol::block_on(exe.run(event_loop(&exe2, &q, &engine, &slots, tasks)));
    log_totals(qid, &engine.borrow());
    // The store handle and tasks are gone before `buffers` drops.
    drop(engine);
    result.map_err(|e| format!("event loop: {e}"))
}

/// The rest of try_serve_queue for a device with batch commands
/// (batch_io.rs): past the gate, the kernel gets every tag's buffer at once
/// and the batch loop serves the same engine.
#[allow(clippy::too_many_arguments)]
fn serve_batched<Q: QueueStore>(
    qid: u16,
    dev: &UblkDev,
    q: &UblkQueue<'_>,
    mut engine: QueueEngine<Q>,
    buffers: &BufferRegion,
    bufs: &[IoBuf],
    gate: &StartGate,
    announced: &mut bool,
) -> Result<(), String> {
    let mut batch = BatchQueue::new(qid, bufs.iter().map(|b| b.as_ptr() as u64).collect());
    crate::test_hooks::die_before_fetch_if_asked(qid);
    pass_gate(gate)?;
    batch.start(q).map_err(|e| e.to_string())?;
    announce(qid, dev, announced, bufs.len(), "batch", buffers);
    let result = batch_loop::serve(q, &mut engine, &mut batch, bufs);
    batch.release(q);
    log_totals(qid, &engine);
    result.map_err(|e| format!("batch loop: {e}"))
}

/// Arrives at the gate ready; an error if another queue could not start.
fn pass_gate(gate: &StartGate) -> Result<(), String> {
    if gate.arrive(true) {
        Ok(())
    } else {
        Err("another queue of this server could not start, so none fetches".into())
    }
}

/// Tells libublk this queue's io buffers are ready (they are one region,
/// mapped and locked by the setup, not libublk IoBufs) and logs how the
/// queue serves its `tags`: with `commands` ("per-tag" or "batch").
fn announce(
    qid: u16,
    dev: &UblkDev,
    announced: &mut bool,
    tags: usize,
    commands: &str,
    buffers: &BufferRegion,
) {
    dev.notify_buffer_registration_complete(false);
    *announced = true;
    log::info!(
        "queue {qid}: serving {tags} tags with {commands} commands, {} KiB io buffers locked",
        buffers.len() >> 10
    );
}

fn log_totals<Q: QueueStore>(qid: u16, engine: &QueueEngine<Q>) {
    let stats = engine.stats();
    log::info!(
        "queue {qid}: {} requests ({} failed) in {} batches, largest {}",
        stats.completed,
        stats.failed,
        stats.batches,
        stats.largest_batch
    );
}

/// One tag's life: fetch a request, run it through the engine, commit the
/// result and fetch the next, until the queue goes down.
async fn serve_tag<Q: QueueStore>(
    q: &UblkQueue<'_>,
    engine: &RefCell<QueueEngine<Q>>,
    slots: &TagSlots,
    tag: u16,
    buf: IoBuf,
) -> Result<(), UblkError> {
    let desc = BufDesc::RawAddress(buf.as_ptr());
    q.submit_io_prep_cmd(tag, desc.clone(), 0, None).await?;
    loop {
        let iod = q.get_iod(tag);
        let result = match request::from_iod(tag, iod, buf) {
            Ok(req) => {
                engine.borrow_mut().enqueue(req);
                slots.wait(tag).await
            }
            Err(errno) => errno,
        };
        q.submit_io_commit_cmd(tag, desc.clone(), result).await?;
    }
}

/// Drives the ring and the store together: tick every ready tag task, send
/// what they queued as one batch, deliver completions, repeat; block in
/// io_uring only when the store has nothing in flight.
async fn event_loop<Q: QueueStore, T>(
    exe: &smol::LocalExecutor<'_>,
    q: &UblkQueue<'_>,
    engine: &RefCell<QueueEngine<Q>>,
    slots: &TagSlots,
    tasks: Vec<smol::Task<T>>,
) -> Result<(), UblkError> {
    let last_progress = Cell::new(Instant::now());
    let run_ops = || loop {
        while exe.try_tick() {}
        let mut e = engine.borrow_mut();
        if !e.has_work() {
            break;
        }
        if e.pump(|c| slots.complete(c.tag, c.result)) > 0 {
            last_progress.set(Instant::now());
        } else {
            // In flight on the store and nothing finished yet: let the
            // ring be polled rather than spin here.
            break;
        }
    };
    let poll_uring = || async {
        let busy = engine.borrow().in_flight() > 0;
        with_task_io_ring_mut(|r| {
            if q.is_stopping() {
                let _ = r.submit_and_wait(0);
                return Err(UblkError::QueueIsDown);
            }
            // While the store has requests in flight the loop polls it,
            // napping in io_uring as the policy says (poll_policy.rs).
            ring_wait::turn(r, busy, last_progress.get().elapsed())
        })
    };
    let reap = |idle_timeout| {
        ublk_reap_io_events_with_update_queue(q, idle_timeout, None, |cqe| {
            ublk_wake_task(cqe.user_data(), cqe)
        })
    };
    let is_done = || tasks.iter().all(|t| t.is_finished());
    run_uring_tasks(poll_uring, reap, run_ops, is_done).await
}
