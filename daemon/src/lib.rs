//! vramblk's process model: the processes a device runs as and what each
//! holds. `vramblk add` and the service plan a device and fork its
//! supervisor; the supervisor holds the device's memory and forks its
//! server and a standby; the server runs ublk-target's queues on a store.
//! The commands (cli/) parse arguments and print; this crate does the rest.
//! docs/process-model.md draws it on one page.
//!
//! - [`plan`]: what a device will be; [`budget`]: the RAM it will lock;
//!   [`locality`]: the CPUs and memory node nearest its GPU.
//! - [`process`]: forking a daemon, its report pipe, hardening for swap.
//! - [`supervise`], [`memory`]: the supervisor and what it holds.
//! - [`server`], [`stats`], [`vram_control`], [`swap`]: the server and its
//!   sockets, swap on its device.
//! - [`upgrade`], [`resume`]: a supervisor re-executing the binary now on
//!   disk and handing its device to it; [`handover`]: how a standby is
//!   woken, and takes a device from a live server (quiesced where it can).
//! - [`held_log`]: log lines held while a device recovers; [`stall`]: a
//!   take-over that does not end, said in the kernel's log.
//! - [`holder`], [`adopt`], [`announce`], [`notify`], [`signals`]: the
//!   service's side: fds held for systemd's fd store, adoption of a device
//!   whose supervisor died, sd_notify, the supervisor's signals.
//! - [`host`]: preconditions (root, ublk_drv); [`logging`]: where logs go;
//!   [`panics`]: a daemon that panics logs where and aborts; [`faults`]:
//!   one that dies of a fault says where in the kernel's log.

pub mod adopt;
pub mod announce;
pub mod budget;
#[cfg(test)]
mod dying_child;
pub mod faults;
pub mod handover;
pub mod held_log;
pub mod holder;
pub mod host;
pub mod locality;
pub mod logging;
pub mod memory;
pub mod notify;
pub mod panics;
pub mod plan;
pub mod process;
pub mod resume;
pub mod server;
pub mod signals;
pub mod stall;
pub mod stats;
pub mod supervise;
pub mod swap;
pub mod upgrade;
pub mod vram_control;

pub use logging::init_logging;
