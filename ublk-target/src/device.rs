//! Adding a ublk device and serving it until it is stopped.

use crate::counters::DeviceCounters;
use crate::features::IoCommands;
use crate::gate::StartGate;
use crate::params::device_params;
use crate::queue::serve_queue;
use crate::queue_threads::{self, QueuePrep, QueueThreads};
use crate::request_timeout;
use crate::take_over::{self, RecoverError};
use libublk::ctrl::UblkCtrl;
use libublk::io::UblkDev;
use libublk::UblkFlags;
use std::sync::Arc;
use thiserror::Error;
use vramblk_store::{BufferRegion, Store};

/// How a server's time with a device ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// The device was stopped or deleted: the server's work is done.
    Removed,
    /// The queues stopped with the device still there: quiesced for a
    /// hand-over to the next server (or a queue failed). It waits for a
    /// new server, so nothing of it may be stopped, erased or forgotten.
    LeftLive,
}

/// Whether to add a new device or take over one whose server died.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    Add,
    Recover(u32),
}

/// The shape of a device.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Device id to ask for, or -1 for the next free one.
    pub id: i32,
    pub queues: u16,
    pub depth: u16,
    pub max_io_bytes: u32,
    pub io_commands: IoCommands,
}

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("creating the ublk device: {0}")]
    Create(libublk::UblkError),
    #[error("serving the ublk device: {0}")]
    Serve(libublk::UblkError),
    #[error(transparent)]
    Recover(#[from] RecoverError),
    #[error("{0}")]
    Invalid(String),
}

impl DeviceOptions {
    pub fn validate(&self) -> Result<(), DeviceError> {
        if self.queues == 0 || self.queues > 256 {
            return Err(DeviceError::Invalid(format!(
                "--queues must be between 1 and 256 (got {})",
                self.queues
            )));
        }
        if !(1..=4096).contains(&self.depth) {
            return Err(DeviceError::Invalid(format!(
                "--depth must be between 1 and 4096 (got {})",
                self.depth
            )));
        }
        if self.max_io_bytes < 4096 || !self.max_io_bytes.is_multiple_of(4096) {
            return Err(DeviceError::Invalid(format!(
                "max io size must be a positive multiple of 4096 (got {})",
                self.max_io_bytes
            )));
        }
        Ok(())
    }

    /// Bytes of io buffers the daemon locks for this shape.
    pub fn locked_buffer_bytes(&self) -> u64 {
        self.queues as u64 * self.depth as u64 * self.max_io_bytes as u64
    }
}

/// Every queue's io buffers, set aside before the device is served: shared
/// mappings, so a supervisor allocates them once and each server it forks
/// (a recovering one too, perhaps while memory is short) serves from them.
pub struct QueueBuffers(Vec<BufferRegion>);

impl QueueBuffers {
    pub fn allocate(opts: &DeviceOptions) -> Result<QueueBuffers, DeviceError> {
        opts.validate()?;
        (0..opts.queues)
            .map(|_| BufferRegion::new_shared(opts.depth as usize, opts.max_io_bytes as usize))
            .collect::<Result<Vec<_>, _>>()
            .map(QueueBuffers)
            .map_err(|e| DeviceError::Invalid(e.to_string()))
    }

    fn queue(&self, qid: u16) -> Option<&BufferRegion> {
        self.0.get(qid as usize)
    }
}

/// Adds a device backed by `store` (or, with [`Start::Recover`], takes over
/// one whose server died) and serves it from `buffers` (one thread per
/// queue) until the device is stopped or deleted. `on_live` runs once
/// the block device serves I/O, with the control handle. `prep` is what
/// the server readied for the queues (a standby's parked threads).
pub fn serve<S, F>(
    opts: &DeviceOptions,
    start: Start,
    store: Arc<S>,
    buffers: Arc<QueueBuffers>,
    counters: Arc<DeviceCounters>,
    prep: QueuePrep,
    on_live: F,
) -> Result<Served, DeviceError>
where
    S: Store,
    F: FnOnce(&UblkCtrl) + Send + Sync + 'static,
{
    opts.validate()?;
    let size = store.size();
    if !size.is_multiple_of(4096) {
        return Err(DeviceError::Invalid(format!(
            "device size must be a multiple of 4096 bytes (got {size})"
        )));
    }
    let mut prep = prep;
    let ctrl = match start {
        Start::Add => take_over::control_builder(opts.max_io_bytes, opts.io_commands)
            .id(opts.id)
            .nr_queues(opts.queues)
            .depth(opts.depth)
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
            .map_err(DeviceError::Create)?,
        Start::Recover(id) => take_over::recover(prep.recovery.take(), opts.max_io_bytes, id)?,
    };
    // The kernel's count, not the one asked for: 6.12 gives a device at
    // most one queue per CPU, and libublk starts a thread per queue it has.
    let queues = ctrl.dev_info().nr_hw_queues;
    let max_io = opts.max_io_bytes;
    let tgt_init = move |dev: &mut UblkDev| {
        dev.tgt.dev_size = size;
        dev.tgt.params = device_params(size, max_io);
        Ok(())
    };
    let q_store = store.clone();
    let gate = Arc::new(StartGate::new(queues as usize));
    let q_fn = move |qid: u16, dev: &UblkDev| {
        serve_queue(
            qid,
            dev,
            q_store.as_ref(),
            buffers.queue(qid),
            counters.clone(),
            &gate,
        )
    };
    let on_live = move |ctrl: &UblkCtrl| {
        let id = ctrl.dev_info().dev_id;
        if let Err(e) = request_timeout::shorten(id) {
            log::warn!(
                "ublk device {id}: could not set its request timeout ({}: {e}); on kernels \
                 before 6.15 a server that dies with a full queue is noticed only after the \
                 default 30 s",
                request_timeout::attribute_path(id).display()
            );
        }
        on_live(ctrl);
    };
    if let Some(f) = prep.before_start {
        f();
    }
    run_target(&ctrl, tgt_init, q_fn, on_live, prep.threads).map_err(DeviceError::Serve)
}

/// libublk's `UblkCtrl::run_target`, with the queue threads started on
/// `threads` where a standby made them ready (queue_threads.rs says why):
/// the target set up, a thread per queue, the device started (or its
/// recovery ended), `device_fn`, then until every queue thread ends. It
/// stops the device afterwards only if it is not still there (Served).
fn run_target<T, Q, W>(
    ctrl: &UblkCtrl,
    tgt_fn: T,
    q_fn: Q,
    device_fn: W,
    threads: Option<QueueThreads>,
) -> Result<Served, libublk::UblkError>
where
    T: FnOnce(&mut UblkDev) -> Result<(), libublk::UblkError>,
    Q: FnOnce(u16, &UblkDev) + Send + Sync + Clone + 'static,
    W: FnOnce(&UblkCtrl),
{
    let dev = Arc::new(UblkDev::new(ctrl.get_name(), tgt_fn, ctrl)?);
    let handles = queue_threads::start_queues(ctrl, &dev, q_fn, threads);
    ctrl.start_dev(&dev)?;
    device_fn(ctrl);
    for h in handles {
        if h.join().is_err() {
            log::error!(
                "ublk device {}: a queue thread panicked",
                dev.dev_info.dev_id
            );
        }
    }
    // The device's own file goes first: a quiesced device turns QUIESCED,
    // and the next server may recover it, the moment it is closed.
    drop(dev);
    if left_live(ctrl) {
        // Quiesced for a hand-over (its fetches aborted with the device
        // kept): STOP_DEV would take the disk away from the next server,
        // and so would this control's drop (libublk deletes a device it
        // added unless told it is disowned).
        ctrl.disown();
        return Ok(Served::LeftLive);
    }
    // Deleted from elsewhere: the stop finds it gone (ENOENT) or stopped.
    let _ = ctrl.stop_dev();
    Ok(Served::Removed)
}

/// Whether the device is still there, not stopped, after its queues
/// ended: a stop or delete leaves it DEAD or gone; a quiesce (or a queue
/// that failed) leaves it LIVE until this server lets go, then QUIESCED.
/// Asked on the control's own ring: a server leaving a quiesced device
/// may be short of memory (the device's swap waits on the next server).
fn left_live(ctrl: &UblkCtrl) -> bool {
    use crate::control::DeviceState;
    ctrl.read_dev_info().is_ok()
        && matches!(
            DeviceState::from_kernel(ctrl.dev_info().state),
            DeviceState::Live | DeviceState::Quiesced | DeviceState::FailIo
        )
}
