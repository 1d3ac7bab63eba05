//! Adding a ublk device and serving it until it is stopped.

use crate::params::device_params;
use crate::queue::serve_queue;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::UblkFlags;
use std::sync::Arc;
use thiserror::Error;
use vramblk_store::Store;

/// The shape of a device.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Device id to ask for, or -1 for the next free one.
    pub id: i32,
    pub queues: u16,
    pub depth: u16,
    pub max_io_bytes: u32,
}

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("creating the ublk device: {0}")]
    Create(libublk::UblkError),
    #[error("serving the ublk device: {0}")]
    Serve(libublk::UblkError),
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

/// Adds a device backed by `store` and serves it on this thread's behalf
/// (one thread per queue) until the device is stopped or deleted.
/// `on_live` runs once the block device exists, with the control handle.
pub fn serve<S, F>(opts: &DeviceOptions, store: Arc<S>, on_live: F) -> Result<(), DeviceError>
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
    let ctrl = UblkCtrlBuilder::default()
        .name("vramblk")
        .id(opts.id)
        .nr_queues(opts.queues)
        .depth(opts.depth)
        .io_buf_bytes(opts.max_io_bytes)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()
        .map_err(DeviceError::Create)?;
    let max_io = opts.max_io_bytes;
    let tgt_init = move |dev: &mut UblkDev| {
        dev.tgt.dev_size = size;
        dev.tgt.params = device_params(size, max_io);
        Ok(())
    };
    let q_store = store.clone();
    let q_fn = move |qid: u16, dev: &UblkDev| serve_queue(qid, dev, q_store.as_ref());
    ctrl.run_target(tgt_init, q_fn, on_live)
        .map_err(DeviceError::Serve)?;
    Ok(())
}
