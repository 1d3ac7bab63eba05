#![allow(rustdoc::broken_intra_doc_links)] // clap turns these comments into --help text, where [[device]], [power] and [pressure] are config sections, not links
use clap::{Args, Parser, Subcommand, ValueEnum};
use vramblk_config::defaults;

/// Turn idle NVIDIA GPU memory into a fast block device (/dev/ublkbN),
/// above all a swap device.
///
/// vramblk registers a ublk device with the kernel and serves it from a
/// daemon: one io_uring queue per CPU, each handing its requests to the
/// store in batches. Needs root and the ublk_drv module (`modprobe ublk_drv`).
///
/// Example: `vramblk add --size 7G --swap` gives /dev/ublkbN, swapped on at
/// high priority. `vramblk del --all` swaps off and removes every device.
///
/// As a service: `cargo xtask install`, describe the devices in
/// /etc/vramblk.toml, `systemctl enable --now vramblk`; `vramblk status`
/// shows what runs.
#[derive(Parser, Debug)]
#[command(name = "vramblk", version, about, long_about, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a device and leave a daemon serving it; prints /dev/ublkbN.
    Add(AddArgs),
    /// Remove devices (swapping them off first); returns once their
    /// memory is free again.
    Del(DelArgs),
    /// Show every ublk device with vramblk's view of it.
    List,
    /// Restart the dead server of a device now.
    ///
    /// When a device's server dies, its supervisor (which holds the
    /// device's memory) starts a new one by itself and the kernel holds
    /// the device's I/O meanwhile; after 5 failures in a row it gives up
    /// and removes the device (a swap device gets 30 more tries, 10 s
    /// apart, first: its removal fails every swapped page's read).
    /// `recover` skips the wait between tries and resets that count. A
    /// device of the service whose supervisor died is adopted by the
    /// service, which holds its memory too.
    Recover(RecoverArgs),
    /// Hand live devices to the vramblk binary now on disk, swap left on.
    ///
    /// After the binary was replaced (a package update, `cargo xtask
    /// install`), each device's supervisor re-executes the new binary in
    /// place, starts a standby server of it and, once that is ready, hands
    /// it the device: on kernels with UBLK_F_QUIESCE (6.16+) the kernel
    /// holds new I/O while the old server answers what it holds and lets
    /// go; on older ones, and for a device with batch commands (7.0+), the
    /// old server is stopped and the kernel re-issues its I/O. The standby
    /// then takes the device over through ublk's user recovery, so nothing
    /// fails and no page is lost. Devices whose
    /// processes already run the binary on disk are left alone (unless
    /// --force). `systemctl reload vramblk` runs this for the service.
    Upgrade(UpgradeArgs),
    /// Print the ublk features the running kernel supports.
    Features,
    /// List the NVIDIA GPUs with their free VRAM and where each sits.
    ///
    /// Index (as --gpu takes it), name, free and total VRAM, PCI address,
    /// and the NUMA node and CPUs nearest it (where the machine has more
    /// than one node: a device on that GPU runs there). From NVML, which
    /// takes no VRAM; where NVML is missing, from CUDA, which holds a
    /// context on each GPU for a moment. Needs no ublk.
    Gpus(GpusArgs),
    /// Work with the configuration file (/etc/vramblk.toml).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Bring up the configured devices as swap.
    ///
    /// Every [[device]] of the configuration file not up yet, each at its
    /// swap priority; one line per device.
    Up(ConfigArg),
    /// Swap off and remove the devices `up` brought up.
    ///
    /// A device whose swapped pages RAM (and other swap) cannot take back
    /// is left serving, and `down` says so and fails: a page is never
    /// dropped.
    Down,
    /// Run as the systemd service (vramblk.service runs this).
    ///
    /// `up`, tell systemd it is ready, follow the [power] and [pressure]
    /// policies of the configuration file, and `down` when stopped. It
    /// holds every device's memory too (and puts it in systemd's fd store),
    /// and recovers a device whose supervisor died, also after its own
    /// restart.
    Service(ServiceArgs),
    /// Show each device and the service's state.
    ///
    /// Per device: state, size, store and GPU (free VRAM), swap use, I/O
    /// counts, p50/p99 latency, its server and supervisor, uptime; then the
    /// service's power and VRAM-pressure state.
    Status {
        /// Print JSON (for scripts).
        #[arg(long, conflicts_with = "prometheus")]
        json: bool,
        /// Print the counters in Prometheus' text format (vramblk_*
        /// metrics), for node_exporter's textfile collector.
        #[arg(long)]
        prometheus: bool,
        /// Write to FILE instead of standard output, through a temporary
        /// file renamed into place, so a reader never sees half of it
        /// (vramblk-metrics.service writes
        /// /var/lib/prometheus/node-exporter/vramblk.prom).
        #[arg(long, value_name = "FILE")]
        output: Option<std::path::PathBuf>,
    },
    /// Give VRAM back now: the unused part (--to), or whole devices.
    ///
    /// With --to SIZE, each device keeps serving and gives back the VRAM
    /// that holds no data (discarded or never written) until it holds SIZE
    /// or what its data needs, in 512 MiB steps; it takes VRAM back by
    /// itself when new data needs room and the GPU has it free. `--to 0`
    /// gives back all it can. Without --to, cuda devices are swapped off
    /// and removed, refused for a device whose pages RAM cannot take back;
    /// `vramblk up` brings configured ones back.
    Release {
        /// Device id (N in /dev/ublkbN); default: every cuda device.
        id: Option<u32>,
        /// Keep the device and hold at most SIZE of VRAM (e.g. 1G, 0).
        #[arg(long, value_name = "SIZE")]
        to: Option<String>,
    },
    /// Swap off before suspend or hibernate, on again after.
    ///
    /// Run by vramblk-sleep.service: `prepare` swaps off every vramblk
    /// device, or fails (and so stops the sleep) when RAM cannot take the
    /// pages back; `resume` swaps them on again.
    Sleep {
        #[arg(value_enum)]
        step: SleepStep,
    },
    /// Print a shell completion script (bash, zsh, fish; elvish, powershell).
    ///
    /// The Debian package installs them; by hand:
    /// `vramblk completions bash > /usr/share/bash-completion/completions/vramblk`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (vramblk.1, one per command) into DIR; `cargo
    /// xtask deb` packages them.
    #[command(hide = true)]
    Manpages {
        #[arg(value_name = "DIR")]
        dir: std::path::PathBuf,
    },
    /// Test hook: flip one bit of device ID's data at byte OFFSET in VRAM,
    /// leaving its checksum, as a bit flipped in the memory would (the
    /// server must run with VRAMBLK_TEST_HOOKS=1).
    #[command(hide = true)]
    FlipBit { id: u32, offset: u64 },
    /// A supervisor after it re-executed itself for `vramblk upgrade`:
    /// STATE names its device, server and memory fds.
    #[command(hide = true, name = "resume-supervisor")]
    ResumeSupervisor {
        #[arg(long, value_name = "DIR")]
        run_dir: std::path::PathBuf,
        state: String,
    },
}

#[derive(Args, Debug)]
pub struct UpgradeArgs {
    /// Device ids (N in /dev/ublkbN); default: every vramblk device.
    pub ids: Vec<u32>,
    /// Hand devices over even when their processes run the binary on disk
    /// already (restarts their servers without swapoff).
    #[arg(long)]
    pub force: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SleepStep {
    Prepare,
    Resume,
}

#[derive(Args, Debug)]
pub struct ConfigArg {
    /// The configuration file.
    #[arg(long, value_name = "PATH", default_value = vramblk_config::CONFIG_PATH)]
    pub config: std::path::PathBuf,
}

#[derive(Args, Debug)]
pub struct ServiceArgs {
    /// The configuration file.
    #[arg(long, value_name = "PATH", default_value = vramblk_config::CONFIG_PATH)]
    pub config: std::path::PathBuf,
    /// Where sysfs is mounted (the power policy reads
    /// class/power_supply there); for tests.
    #[arg(long, value_name = "DIR", default_value = "/sys", hide = true)]
    pub sysfs: std::path::PathBuf,
    /// Read each GPU's free VRAM from DIR/INDEX (a size, e.g. "6G")
    /// instead of NVML; for tests.
    #[arg(long, value_name = "DIR", hide = true)]
    pub free_vram_from: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// GPU memory through CUDA.
    Cuda,
    /// Host RAM (a memfd): for tests and for trying vramblk without a GPU.
    Host,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IntegrityArg {
    /// On where the GPU's memory has no ECC (GeForce GDDR), off where ECC
    /// is on (it finds those errors itself).
    Auto,
    /// Always, on a GPU with ECC too.
    On,
    /// Never: a bit flipped in VRAM reaches the process unnoticed.
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CopyModeArg {
    /// The requests of each queue round move together through one copy
    /// kernel on the GPU's SMs (rounds of 1-3 requests use the copy
    /// engines, which answer a lone request sooner).
    Auto,
    /// Copy engines only: one DMA copy per request, no SM time taken from
    /// other GPU work (slower for small random I/O).
    Dma,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompressArg {
    /// Every page whole, in 2 MiB extents of VRAM.
    Off,
    /// Same-filled pages (zero pages above all) as their 8-byte word in
    /// the page map, no VRAM; the rest whole.
    Same,
    /// Same-filled pages so, the rest compressed on the GPU into LZ4
    /// blocks where they shrink: 2.3-2.7x more data than VRAM on real
    /// programs' memory, and slower than off (docs/benchmarks.md).
    Lz,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IoCommandsArg {
    /// Batch commands where the kernel offers them (UBLK_F_BATCH_IO, Linux
    /// 7.0+: one command fetches a round's requests, one commits their
    /// results), else one command per request.
    Auto,
    /// One command per request on every kernel (to compare, or to work
    /// around a kernel whose batch commands misbehave).
    PerTag,
}

#[derive(Args, Debug)]
pub struct GpusArgs {
    /// Print JSON (index, name, free, total, pci_bus_id) instead.
    #[arg(long)]
    pub json: bool,
    /// Ask CUDA even where NVML is there (to check one against the other).
    #[arg(long, hide = true)]
    pub cuda: bool,
}

#[derive(Args, Debug)]
pub struct AddArgs {
    /// Device size: 7G, 7GiB, 512M, 1073741824 (binary units; a multiple of 4 KiB).
    #[arg(long, value_name = "SIZE")]
    pub size: String,

    /// Where the bytes live.
    #[arg(long, value_enum, default_value = "cuda")]
    pub backend: BackendArg,

    /// GPU for --backend cuda, in PCI bus order (as nvidia-smi counts):
    /// an index (0), a list (0,2) or all. Over several GPUs it adds one
    /// device per GPU, --size split between them by each GPU's VRAM free
    /// beyond --reserve, all swap at the same priority (the kernel then
    /// spreads pages over them in turn); one line per device.
    #[arg(long, value_name = "N|N,M|all", default_value = "0")]
    pub gpu: vramblk_config::GpuChoice,

    /// VRAM left free for the display and other GPU work (--backend cuda).
    /// The size is a ceiling: when VRAM is short the device gets less, in
    /// 512 MiB steps.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    pub reserve: String,

    /// Hardware queues (one thread each); default: one per CPU (per CPU of
    /// its GPU's NUMA node where the device is pinned there).
    #[arg(long, value_name = "N")]
    pub queues: Option<u16>,

    /// How data moves between the io buffers and VRAM (--backend cuda).
    #[arg(long, value_enum, default_value = "auto")]
    pub copy_mode: CopyModeArg,

    /// Every 4 KiB page in VRAM carries a checksum (CRC32C), stored and
    /// checked in the round that moves it (by the copy kernel on the GPU,
    /// or on the CPU for a lone request): a page that changed in VRAM (a
    /// bit flip on a GPU without ECC) fails its read with EIO, so its
    /// process is killed instead of handed wrong memory. Costs 0.1% of the
    /// VRAM and about 3 us per lone request (--backend cuda;
    /// docs/benchmarks.md).
    #[arg(long, value_enum, default_value = "auto")]
    pub integrity: IntegrityArg,

    /// How the queues take requests from the kernel and return results
    /// (`vramblk features` says whether this kernel has batch commands).
    #[arg(long, value_enum, default_value = "auto")]
    pub io_commands: IoCommandsArg,

    /// How the device keeps its pages in VRAM (--backend cuda). Compressed
    /// pages take VRAM only as their blocks need it, so --size may exceed
    /// the VRAM the device holds; writes fail with ENOSPC (swap keeps the
    /// page in RAM) once neither its VRAM nor the GPU has room, and
    /// `vramblk status` shows DATA, COMPR and TOTAL as zramctl does.
    #[arg(long, value_enum, default_value = "off")]
    pub compress: CompressArg,

    /// Requests in flight per queue. Each holds a 512 KiB io buffer locked
    /// in RAM: queues x depth x 512 KiB in all (64 MiB for 2 queues at
    /// the default depth).
    #[arg(long, value_name = "N", default_value_t = defaults::QUEUE_DEPTH)]
    pub depth: u16,

    /// Back --backend host with 2 MiB huge pages reserved at boot
    /// (hugepages=N), which sit outside the memory swap relieves.
    #[arg(long)]
    pub hugepages: bool,

    /// Run mkswap and swapon on the new device.
    #[arg(long)]
    pub swap: bool,

    /// Swap priority (higher is used first; zram's usual is 100).
    #[arg(long, value_name = "N", default_value_t = defaults::SWAP_PRIORITY, requires = "swap", allow_negative_numbers = true)]
    pub priority: i32,

    /// Pass --discard to swapon, so freed swap pages are discarded (and
    /// their VRAM given back). Always on with --compress, whose device may
    /// be larger than its VRAM.
    #[arg(long, requires = "swap")]
    pub discard: bool,

    /// Serve in this process instead of leaving a daemon (logs to stderr).
    #[arg(long)]
    pub foreground: bool,

    /// Ask for this device id instead of the next free one.
    #[arg(long, value_name = "ID")]
    pub id: Option<u32>,

    /// Where sysfs is mounted (where a GPU's NUMA node and CPUs are
    /// read); for tests.
    #[arg(long, value_name = "DIR", default_value = "/sys", hide = true)]
    pub sysfs: std::path::PathBuf,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["id", "all"])))]
pub struct DelArgs {
    /// Device id (N in /dev/ublkbN).
    pub id: Option<u32>,

    /// Every vramblk device.
    #[arg(long)]
    pub all: bool,
}

#[derive(Args, Debug)]
pub struct RecoverArgs {
    /// Device id (N in /dev/ublkbN).
    pub id: u32,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Check a configuration file: unknown keys and bad values are
    /// reported with the line; prints the devices it describes.
    Check {
        /// The file to check.
        #[arg(default_value = vramblk_config::CONFIG_PATH)]
        path: std::path::PathBuf,
    },
}
