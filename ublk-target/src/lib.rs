//! The ublk side of vramblk: a block device whose queues hand their requests
//! to a [`vramblk_store::Store`] in batches. Knows nothing of CUDA.
//!
//! - [`engine`]: the per-queue batching engine, independent of ublk so the
//!   GPU benchmark can drive it with a synthetic load.
//! - `queue`: the one queue loop every backend runs: a queue's setup, then
//!   per-tag commands (libublk + smol, a task per tag), or where the kernel
//!   gave the device batch I/O, `batch_loop` over `batch_io`'s commands;
//!   both feed the same engine and turn their ring as `ring_wait` says.
//! - [`queue_threads`]: queue threads (and their rings) a standby starts
//!   in advance, and the start of a device's queues on them.
//! - [`device`]: adding and serving a device.
//! - [`take_over`]: the control a new server recovers a device with,
//!   opened without reading a file that may sit in swap on the device.
//! - [`control`]: finding, inspecting and deleting devices.
//! - [`features`]: the kernel's ublk feature flags and which vramblk needs.
//! - [`poll_policy`]: how a queue waits for its store (spin, then nap).
//! - `request_timeout`: the request timeout that bounds how late older
//!   kernels notice a dead server.

mod batch_io;
mod batch_loop;
pub mod control;
pub mod counters;
pub mod device;
pub mod engine;
pub mod features;
mod gate;
mod params;
pub mod poll_policy;
mod queue;
pub mod queue_threads;
mod request;
mod request_timeout;
mod ring_wait;
mod slots;
mod stranded;
pub mod take_over;
pub mod test_hooks;

pub use control::{ControlError, DeviceInfo, DeviceState};
pub use counters::{CounterSnapshot, DeviceCounters};
pub use device::{serve, DeviceError, DeviceOptions, QueueBuffers, Served, Start};
pub use engine::QueueEngine;
pub use features::IoCommands;
pub use queue_threads::{QueuePrep, QueueThreads};
