//! The server: the process that maps the device's memory and runs its
//! queues. The supervisor forks one per start; a server that dies is
//! replaced by a new one that recovers the device.

use crate::handover;
use crate::held_log;
use crate::memory::{hand_over, Held, HeldVram, Memory};
use crate::plan::Plan;
use crate::process::{self, Reporter};
use crate::stats;
use crate::swap;
use crate::vram_control;
use anyhow::{Context, Result};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use vramblk_config::{format_size, Backend, CopyMode, DeviceRecord};
use vramblk_cuda_store::{Compress, CopyPolicy, CudaStore, CudaStoreOptions};
use vramblk_store::Store;
use vramblk_ublk_target::control::bdev_path;
use vramblk_ublk_target::{serve, DeviceCounters, QueuePrep, QueueThreads, Served, Start};

/// One start of a server.
pub struct Launch {
    pub start: Start,
    pub restarts: u32,
    /// Foreground only, first start only: swap on (priority, discard) once
    /// live, and print the path.
    pub foreground_swap: Option<(i32, bool)>,
    pub print_path: bool,
}

/// A standby's two eventfds: the supervisor writes to `go` to make it take
/// over (handover.rs says what the word holds); it writes 1 to `ready` once
/// it waits for that with everything prepared.
pub struct Standby {
    pub go: OwnedFd,
    pub ready: OwnedFd,
}

/// Runs in a forked server; returns its exit code. A standby prepares
/// everything it can, then waits until the supervisor tells it to take
/// over; it dies with the supervisor meanwhile (PR_SET_PDEATHSIG).
pub fn main(
    plan: &Plan,
    held: &Held,
    run_dir: &Path,
    mut launch: Launch,
    reporter: Reporter,
    standby: Option<Standby>,
) -> i32 {
    crate::signals::reset_for_server();
    // A server forked to recover (no standby was ready): the device waits
    // on it, and memory may be exhausted.
    let recovering = launch.start != Start::Add && standby.is_none();
    if recovering {
        held_log::hold();
    }
    if let Err(e) = process::prepare_server_process(!recovering) {
        log::error!("server: {e:#}");
        reporter.fail(&format!("{e:#}"));
        held_log::release();
        return 1;
    }
    let ctx = ServeWith {
        plan,
        held,
        run_dir,
        reporter: reporter.clone(),
        prep: QueuePrep::default(),
        on_live: None,
    };
    let result = match &held.memory {
        Memory::Host(store) => {
            let Some(prep) = standby_ready(standby, &mut launch, plan) else {
                return 0;
            };
            let ctx = ServeWith { prep, ..ctx };
            serve_store(ctx, store.clone(), &launch)
        }
        Memory::Cuda { vram, sockets } => open_vram(plan, vram.as_ref(), sockets.1.as_fd())
            .and_then(|mut store| {
                let Some(prep) = standby_ready(standby, &mut launch, plan) else {
                    return Ok(Served::Removed);
                };
                if vram.is_some() {
                    // Where every extent lives now (a standby imported the
                    // VRAM long before), with free slots zeroed.
                    Arc::get_mut(&mut store)
                        .context("the store is shared before serving")?
                        .take_over()?;
                }
                let ctx = ServeWith {
                    prep,
                    on_live: Some(vram_control_on_live(
                        run_dir,
                        store.clone(),
                        sockets.1.as_fd(),
                        plan.reserve,
                    )),
                    ..ctx
                };
                let served = serve_store(ctx, store.clone(), &launch)?;
                if served == Served::Removed {
                    // The device is gone: zero the VRAM (swap pages can
                    // hold secrets) before the supervisor lets go of it.
                    store.erase()?;
                    log::info!("server: VRAM erased");
                }
                Ok(served)
            }),
    };
    let code = match result {
        Ok(Served::Removed) => 0,
        Ok(Served::LeftLive) => EXIT_LEFT_LIVE,
        Err(e) => {
            log::error!("server: {e:#}");
            reporter.fail(&format!("{e:#}"));
            1
        }
    };
    held_log::release();
    code
}

/// A server's exit code when its queues stopped with the device still
/// there (quiesced for an upgrade's hand-over, or a queue failed): the
/// device waits for the next server, which the supervisor provides.
pub const EXIT_LEFT_LIVE: i32 = 3;

/// The store's copy policy for the plan's copy mode.
fn copy_policy(plan: &Plan) -> CopyPolicy {
    match plan.copy_mode {
        CopyMode::Auto => CopyPolicy::AUTO,
        CopyMode::Dma => CopyPolicy::DMA,
    }
}

/// The cuda store's options for the plan.
fn store_options(plan: &Plan) -> CudaStoreOptions {
    CudaStoreOptions {
        size: plan.size,
        gpu: plan.gpu,
        reserve: plan.reserve,
        copy: copy_policy(plan),
        integrity: plan.integrity,
        compress: match plan.compress {
            vramblk_config::Compress::Off => Compress::Off,
            vramblk_config::Compress::Same => Compress::Same,
            vramblk_config::Compress::Lz => Compress::Lz,
        },
    }
}

/// The VRAM of a cuda server: imported from what the supervisor holds, or
/// allocated (first start) and handed to the supervisor, so it outlives
/// this server. Either way it is not erased when this server ends badly.
fn open_vram(
    plan: &Plan,
    held: Option<&HeldVram>,
    servers_end: BorrowedFd,
) -> Result<Arc<CudaStore>> {
    let store = match held {
        Some(v) => CudaStore::import(
            &CudaStoreOptions {
                size: v.size,
                ..store_options(plan)
            },
            &v.borrowed(),
        )?,
        None => {
            let store = CudaStore::create(&store_options(plan))?;
            if store.size() < plan.size {
                log::warn!(
                    "VRAM short: {} asked, {} granted",
                    format_size(plan.size),
                    format_size(store.size())
                );
            }
            match hand_over(&store, servers_end) {
                Ok(()) => store,
                Err(e) => {
                    log::warn!(
                        "server: the VRAM stays with this server, so a crash loses it: {e:#}"
                    );
                    return Ok(Arc::new(store));
                }
            }
        }
    };
    store.set_erase_on_drop(false);
    Ok(Arc::new(store))
}

/// A standby's wait: everything it can ready beforehand is readied, then
/// it says so and waits for the word to take over. None when no word can
/// come; else what it readied for the queues (nothing for a server that
/// was no standby).
///
/// Memory is short when the word comes, and every allocation of a server
/// (an I/O flusher) then waits until pages are free, with nothing to free
/// them while the device has no server. So the standby starts its queue
/// threads now, each with its queue ring (ublk_target::queue_threads), and
/// its other threads' stacks are cached; it sets memory aside, a quarter
/// freed at the word (the control commands' few pages) and the rest right
/// before the queues start (freed at the word, other processes' faults
/// would take it while this server waits for the kernel, as a 7.3 run once
/// showed: a new queue thread's first page waited for good).
fn standby_ready(standby: Option<Standby>, launch: &mut Launch, plan: &Plan) -> Option<QueuePrep> {
    let Some(Standby { go, ready }) = standby else {
        return Some(QueuePrep::default());
    };
    let threads = match QueueThreads::start(plan.device.queues, plan.device.depth) {
        Ok(t) => Some(t),
        Err(e) => {
            log::warn!("standby: its queue threads start only when it takes over ({e})");
            None
        }
    };
    let unready = if threads.is_some() {
        0
    } else {
        plan.device.queues as usize
    };
    process::warm_thread_stacks(unready + SPARE_THREADS);
    // The control it will recover the device with, built while the device
    // is served (take_over.rs: a take-over must not read a
    // file that may sit in swap on this device).
    let recovery = match launch.start {
        Start::Recover(id) => {
            match vramblk_ublk_target::take_over::prepare_recovery(plan.device.max_io_bytes, id) {
                Ok(r) => Some(r),
                Err(e) => {
                    log::warn!(
                        "standby: its recovery control is built only when it takes over ({e})"
                    );
                    None
                }
            }
        }
        Start::Add => None,
    };
    let for_control = process::Cushion::new(CUSHION_BYTES / 4);
    let for_queues = process::Cushion::new(CUSHION_BYTES - CUSHION_BYTES / 4);
    // An upgrade stops the old server only after this (supervise.rs).
    let _ = rustix::io::write(&ready, &1u64.to_ne_bytes());
    drop(ready);
    let go = wait_for_go(go)?;
    // Taking over: the device waits on this server.
    held_log::hold();
    vramblk_ublk_target::test_hooks::panic_on_take_over_if_asked();
    launch.restarts = go.restarts;
    drop(for_control);
    if let (Some(from), Start::Recover(id)) = (go.from, launch.start) {
        let how = handover::take_from(id, from);
        log::info!(
            "server: taking {} over from the old binary's server {from}: {how}",
            bdev_path(id)
        );
    }
    Some(QueuePrep {
        threads,
        before_start: Some(Box::new(move || drop(for_queues))),
        recovery,
    })
}

/// Threads a server starts besides its queue threads (libublk's and the
/// stats socket's), whose stacks a standby also has ready.
const SPARE_THREADS: usize = 4;

/// Memory a standby sets aside for its takeover.
const CUSHION_BYTES: usize = 16 << 20;

/// The program's own pages (text, libraries, page tables, the private
/// pages each forked process copies when it locks itself), per process.
const IMAGE_BYTES: u64 = 4 << 20;

/// RAM the processes of a device with `queues` queues lock: the
/// supervisor with its cushion, and the server and its standby, each with
/// its kept heap and thread stacks; the standby's cushion.
pub fn locked_by_processes(queues: u16) -> u64 {
    let stacks = (queues as u64 + SPARE_THREADS as u64) * process::QUEUE_STACK as u64;
    let heap = process::HEAP_KEPT as u64 * 3 / 2;
    let server = heap + stacks + IMAGE_BYTES;
    IMAGE_BYTES
        + 2 * server
        + CUSHION_BYTES as u64
        + crate::process::SUPERVISOR_CUSHION_BYTES as u64
}

/// Blocks until the supervisor writes its word to the eventfd (Some), or
/// dies (None: the standby was set to get SIGKILL then, so this returns
/// None only on a read error).
fn wait_for_go(go: OwnedFd) -> Option<handover::Go> {
    use rustix::process::{set_parent_process_death_signal, Signal};
    // Die with the supervisor while only standing by.
    let _ = set_parent_process_death_signal(Some(Signal::KILL));
    // Gone before the death signal was armed?
    supervisor_pid()?;
    let mut word = [0u8; 8];
    let n = loop {
        match rustix::io::read(&go, &mut word) {
            Err(rustix::io::Errno::INTR) => continue,
            other => break other,
        }
    };
    // A server that serves must outlive its supervisor.
    let _ = set_parent_process_death_signal(None);
    if n != Ok(8) {
        return None;
    }
    handover::read_word(u64::from_ne_bytes(word))
}

/// The parent, unless it is already gone (re-parented to init).
fn supervisor_pid() -> Option<u32> {
    rustix::process::getppid()
        .map(|p| p.as_raw_nonzero().get() as u32)
        .filter(|&p| p > 1)
}

/// What every server serves with, whatever its store.
struct ServeWith<'a> {
    plan: &'a Plan,
    held: &'a Held,
    run_dir: &'a Path,
    reporter: Reporter,
    /// What a standby readied for its queues (standby_ready).
    prep: QueuePrep,
    /// What the store adds once the device is live, given its id.
    on_live: Option<OnLive>,
}

type OnLive = Box<dyn FnOnce(u32) + Send + Sync>;

/// A cuda server's control socket, opened once the device is live.
fn vram_control_on_live(
    run_dir: &Path,
    store: Arc<CudaStore>,
    servers_end: BorrowedFd,
    floor: u64,
) -> OnLive {
    let run_dir = run_dir.to_path_buf();
    let servers_end = servers_end.try_clone_to_owned();
    Box::new(move |id| {
        let started = servers_end.map_err(|e| e.to_string()).and_then(|end| {
            vram_control::serve(&run_dir, id, store, end, floor).map_err(|e| e.to_string())
        });
        if let Err(e) = started {
            log::warn!("server: no VRAM control socket ({e}); VRAM cannot be given back");
        }
    })
}

fn serve_store<S: Store>(ctx: ServeWith, store: Arc<S>, launch: &Launch) -> Result<Served> {
    let ServeWith {
        plan,
        held,
        run_dir,
        reporter,
        prep,
        on_live: store_on_live,
    } = ctx;
    match launch.start {
        Start::Add => log::info!(
            "server: adding a {} device on {} with {} queues x depth {} ({} MiB of io buffers locked)",
            format_size(store.size()),
            store.describe(),
            plan.device.queues,
            plan.device.depth,
            plan.device.locked_buffer_bytes() >> 20
        ),
        Start::Recover(id) => log::info!(
            "server: recovering {} on {} (restart {})",
            bdev_path(id),
            store.describe(),
            launch.restarts
        ),
    }
    let record_base = DeviceRecord {
        id: 0,
        size: store.size(),
        backend: plan.backend,
        store: store.describe(),
        gpu: (plan.backend == Backend::Cuda).then_some(plan.gpu),
        queues: plan.device.queues,
        depth: plan.device.depth,
        pid: crate::host::own_pid(),
        log: plan.log.clone(),
        holder_pid: supervisor_pid(),
        restarts: launch.restarts,
        origin: plan.origin,
        live_since: None,
        backing: store.backing_layout(),
        copy_mode: plan.copy_mode,
        integrity: store.integrity(),
        compress: plan.compress,
        place: plan.place.clone(),
    };
    let dir = run_dir.to_path_buf();
    let counters = Arc::new(DeviceCounters::new(plan.device.queues));
    let live_counters = counters.clone();
    let queues = plan.device.queues;
    let live_reporter = reporter.clone();
    let id_cell = Arc::new(Mutex::new(None));
    let id_seen = id_cell.clone();
    let foreground_swap = launch.foreground_swap;
    let print_path = launch.print_path;
    let on_live = move |ctrl: &libublk::ctrl::UblkCtrl| {
        held_log::release();
        let id = ctrl.dev_info().dev_id;
        *id_seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
        // A recovering server keeps the first server's start time.
        let live_since = DeviceRecord::load(&dir, id)
            .and_then(|r| r.live_since)
            .or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs())
            });
        let record = DeviceRecord {
            id,
            live_since,
            ..record_base
        };
        if let Err(e) = record.store(&dir) {
            log::warn!("could not write the device record: {e}");
        }
        let path = bdev_path(id);
        log::info!("server: {path} is live");
        if let Err(e) = stats::serve(&stats::socket_path(&dir, id), live_counters, queues) {
            log::warn!("server: no stats socket ({e}); `vramblk status` shows no latency");
        }
        if let Some(f) = store_on_live {
            f(id);
        }
        if let Some((priority, discard)) = foreground_swap {
            if let Err(e) = swap::enable(&path, priority, discard) {
                log::error!("{e:#}; removing the device");
                let _ = ctrl.kill_dev();
                return;
            }
        }
        if print_path {
            println!("{path}");
        }
        live_reporter.live(id);
    };
    let result = serve(
        &plan.device,
        launch.start,
        store,
        held.buffers.clone(),
        counters,
        prep,
        on_live,
    );
    let served = result.context("serving the device")?;
    if let Some(id) = *id_cell.lock().unwrap_or_else(|p| p.into_inner()) {
        match served {
            Served::Removed => {
                DeviceRecord::remove(run_dir, id);
                let _ = std::fs::remove_file(stats::socket_path(run_dir, id));
                let _ = std::fs::remove_file(vram_control::socket_path(run_dir, id));
                log::info!("server: {} removed; exiting", bdev_path(id));
            }
            // Its record, sockets and VRAM are the next server's.
            Served::LeftLive => log::info!(
                "server: the queues of {} stopped with the device still there (quiesced for \
                 the next server); exiting and leaving it to that server",
                bdev_path(id)
            ),
        }
    }
    Ok(served)
}
