//! Configuration types shared by the CLI, the daemon and the tools.

mod file;
mod gpus;
mod record;
mod size;

pub use file::{
    Compress, Config, ConfigError, CopyMode, DeviceConfig, IoCommands, PowerConfig, PressureConfig,
    CONFIG_PATH,
};
pub use gpus::{split_by_room, GpuChoice, GpuPlace, GpuRoom, SPLIT_UNIT};
pub use record::{store_json, DeviceRecord, RUN_DIR};
pub use size::{format_size, human_size, parse_size, parse_size_or_zero, SizeError};

use serde::{Deserialize, Serialize};

/// Where a device keeps its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// GPU memory through CUDA.
    Cuda,
    /// Host RAM (a memfd), for tests and machines without a GPU.
    Host,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Cuda => "cuda",
            Backend::Host => "host",
        })
    }
}

/// Defaults a device gets when the user names none.
pub mod defaults {
    /// Requests in flight per queue.
    pub const QUEUE_DEPTH: u16 = 64;
    /// Largest single request, and the size of each tag's io buffer.
    pub const MAX_IO_BYTES: u32 = 512 << 10;
    /// Above zram's usual 100, so VRAM fills before compressed RAM.
    pub const SWAP_PRIORITY: i32 = 1000;
}
