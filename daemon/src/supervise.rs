//! The supervisor: the process `vramblk add` leaves behind. It holds the
//! device's memory and io buffers (so the data outlives any server), forks
//! the server, and keeps a standby server ready: forked, locked and
//! warmed up while memory is plentiful, waiting on an eventfd to take over.
//! When the server dies, the standby recovers the device through ublk's
//! user recovery (I/O waits in the kernel meanwhile) with almost nothing
//! left to allocate, since the machine may be short of memory exactly
//! then: swap I/O is waiting on the dead server. A crash loop ends after
//! MAX_FAILURES tries: the device is removed so its I/O fails instead of
//! waiting forever. A server SIGKILLed from outside is always recovered:
//! that is no crash loop, and giving up would lose every page. Asked to
//! upgrade, it re-executes the binary now on disk and hands the device to
//! a standby of the new binary (upgrade.rs).

use crate::memory::{Held, Memory};
use crate::plan::Plan;
use crate::process::{self, Reporter, SUPERVISOR_CUSHION_BYTES};
use crate::server::{self, Launch};
use crate::stall::StallReporter;
use crate::upgrade::{self, ResumeState};
use crate::{announce, handover, held_log, locality, signals, swap};
use anyhow::{anyhow, bail, Result};
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};
use vramblk_config::DeviceRecord;
use vramblk_ublk_target::control::{bdev_path, delete_device, delete_device_nowait, device_ids};
use vramblk_ublk_target::{QueueBuffers, Start};

/// Restarts in a row that may fail (the server crashing or exiting with an
/// error before it served for STABLE; a SIGKILL does not count) before the
/// supervisor gives up.
pub const MAX_FAILURES: u32 = 5;
/// A server that served this long counts as healthy: the failure count
/// starts again.
const STABLE: Duration = Duration::from_secs(30);
/// Wait before restart n (1-based) of a run of failures: the first at
/// once, since I/O (perhaps swap) is waiting.
const BACKOFF_MS: [u64; MAX_FAILURES as usize] = [0, 500, 1000, 2000, 4000];
// The wait between restarts once a swap device's server has failed more
// than MAX_FAILURES times in a row, and how many more it gets before it is
// given up (see `next_step`).
use swap::{KEEP_RETRIES as SWAP_RETRIES, KEEP_RETRY as SWAP_RETRY};
/// How often the supervisor looks at its servers and its signals.
const TICK_MS: i32 = 100;
/// Least time between two standbys forked, should they keep dying.
const STANDBY_RESPAWN: Duration = Duration::from_secs(5);

/// How the supervisor was started.
pub enum Mode {
    /// In the user's terminal (`add --foreground`); swap set up by the
    /// first server, which also prints the path.
    Foreground { swap: Option<(i32, bool)> },
    /// Detached; `add` sets up swap once told the device is live.
    Daemon,
}

/// A forked server: its pid, the pipe it reports on, for a standby the
/// eventfd that tells it to take over and the one it says it is ready on,
/// and a pidfd that turns readable the moment it dies (so recovery starts
/// without waiting for a tick; None on a kernel without pidfd_open, where
/// the tick finds the death).
struct Child {
    pid: libc::pid_t,
    report: Option<OwnedFd>,
    go: Option<OwnedFd>,
    ready: Option<OwnedFd>,
    exited: Option<OwnedFd>,
    /// Serving already when this supervisor took it on: the server a
    /// supervisor had before it re-executed itself (upgrade.rs).
    already_live: bool,
}

impl Child {
    /// The live server of the supervisor this process was before it
    /// re-executed itself: still our child, its report long read.
    fn inherited(pid: libc::pid_t) -> Child {
        Child {
            pid,
            report: None,
            go: None,
            ready: None,
            exited: pidfd_of(pid),
            already_live: true,
        }
    }

    /// Whether a standby has said it is ready to take over.
    fn is_ready(&self) -> bool {
        self.ready
            .as_ref()
            .is_some_and(|fd| process::readable_within(fd, 0))
    }
}

/// A device being handed to the binary this supervisor re-executed: the
/// old binary's server serves until a standby of the new one is ready,
/// which then takes the device from it (quiesced, or the old server
/// killed: handover.rs) and recovers it.
struct Handover {
    old_server: libc::pid_t,
    /// The old server leaves a quiesced device alone (ResumeState), so its
    /// successor may quiesce the device instead of having it killed.
    lets_go: bool,
    started: Instant,
    /// When the old server was told to stop (killed, or its successor woken
    /// to quiesce the device).
    stopped: Option<Instant>,
    /// The new binary's standby, woken to quiesce the device and take it
    /// over once the old server has let go.
    successor: Option<Child>,
    /// The old server was killed for not letting go (hurry_old_server).
    hurried: bool,
}

/// How long a new standby may take to get ready before an upgrade is
/// given up (the old server keeps serving).
const HANDOVER_PATIENCE: Duration = Duration::from_secs(60);

/// How a server's run ended.
struct Run {
    pid: libc::pid_t,
    status: ExitStatus,
    /// How long it served, if it reported the device live.
    live_for: Option<Duration>,
    /// What it reported, if it failed before going live.
    failure: Option<String>,
}

/// What to do after a server's run.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// The device is gone (deleted): exit.
    Done,
    /// Recover the device, after waiting this long.
    Restart(Duration),
    /// Remove the device and exit, for this reason.
    GiveUp(String),
}

/// Decides what follows a server's death; `failures` counts the run of
/// failed restarts and is updated. `is_swap` (asked only when the run is
/// long enough to give up) says whether the device is swap: then it is
/// recovered every [`SWAP_RETRY`] for [`SWAP_RETRIES`] more tries before
/// it is given up, since removing it fails every swapped page's read (the
/// processes owning them die, and the kernel panics if init is among
/// them), where waiting loses nothing if the cause passes (a storm of
/// crashes, memory short, a take-over race). A cause that does not pass
/// (the GPU gone for good, and the pages with it) still ends in the
/// give-up, minutes later; `vramblk del` takes the device away sooner.
fn next_step(
    run: &Run,
    device_exists: bool,
    memory_survives: bool,
    failures: &mut u32,
    is_swap: impl FnOnce() -> bool,
) -> Next {
    if run.status.success() || !device_exists {
        return Next::Done;
    }
    if !memory_survives {
        return Next::GiveUp(format!(
            "its server died ({}) and its VRAM with it (it was never handed to the supervisor)",
            run.status
        ));
    }
    if run.live_for.is_some_and(|t| t >= STABLE) {
        *failures = 0;
    }
    if killed_by(run.status, libc::SIGKILL) {
        // Killed from outside (an administrator, a script; never the OOM
        // killer, which the server is exempt from), not a fault of the
        // server: however often it comes, giving up would throw away
        // every page the device holds, so recover at once and count
        // nothing.
        return Next::Restart(Duration::ZERO);
    }
    *failures += 1;
    if *failures > MAX_FAILURES {
        if *failures <= MAX_FAILURES + SWAP_RETRIES && is_swap() {
            return Next::Restart(SWAP_RETRY);
        }
        return Next::GiveUp(format!(
            "its server died {} times in a row (last: {})",
            *failures - 1,
            run.status
        ));
    }
    Next::Restart(Duration::from_millis(BACKOFF_MS[*failures as usize - 1]))
}

struct Supervisor<'a> {
    plan: &'a Plan,
    run_dir: &'a Path,
    held: Held,
    parent: Option<Reporter>,
    id: Option<u32>,
    standby: Option<Child>,
    standby_forked: Option<Instant>,
    /// Locked pages set aside while memory is plentiful and unmapped right
    /// before forking a server to recover with no standby ready: that
    /// fork and the new server's first allocations then find free pages
    /// while swap waits on the device (the standby keeps a cushion of its
    /// own for the same reason).
    cushion: Option<process::Cushion>,
    /// The service socket the memory fds were last handed to, if any; a
    /// different one (a restarted service) gets them again.
    announced: Option<announce::SocketId>,
    /// When the last server death was seen, until the device is live again
    /// (the log says how long the device went unserved).
    down_since: Option<Instant>,
    /// Restarts so far (servers record it; a standby is told its number).
    restarts: u32,
    /// An upgrade under way.
    handover: Option<Handover>,
    /// Says in the kernel's log when a take-over does not end.
    stall: StallReporter,
    /// Marked an I/O flusher (become_flusher).
    io_flusher: bool,
}

pub fn run(plan: &Plan, run_dir: &Path, parent: Reporter, mode: Mode) -> Result<()> {
    process::harden_for_swap()?;
    pin_near_gpu(plan);
    signals::install_supervisor_handlers();
    let (foreground_swap, print_path) = match mode {
        Mode::Foreground { swap } => (swap, true),
        Mode::Daemon => (None, false),
    };
    let first = Launch {
        start: Start::Add,
        restarts: 0,
        foreground_swap,
        print_path,
    };
    supervise_with(
        plan,
        run_dir,
        Some(parent),
        Held::create(plan)?,
        None,
        First::Fork(first),
    )
}

/// A supervisor for device `id`, whose last supervisor died: it holds
/// `memory` (from the service's copies of the fds) and recovers the device
/// as restart number `restarts`.
pub fn adopt(
    plan: &Plan,
    run_dir: &Path,
    parent: Reporter,
    memory: Memory,
    id: u32,
    restarts: u32,
) -> Result<()> {
    process::harden_for_swap()?;
    pin_near_gpu(plan);
    signals::install_supervisor_handlers();
    let held = Held::with_memory(plan, memory)?;
    let first = Launch {
        start: Start::Recover(id),
        restarts,
        foreground_swap: None,
        print_path: false,
    };
    supervise_with(
        plan,
        run_dir,
        Some(parent),
        held,
        Some(id),
        First::Fork(first),
    )
}

/// The supervisor of a live device after it re-executed itself as the
/// binary now on disk (upgrade.rs): it holds `memory` again, keeps the
/// old binary's server serving until a standby of its own is ready, then
/// stops that server so the standby takes over.
pub fn resume(plan: &Plan, run_dir: &Path, memory: Memory, state: &ResumeState) -> Result<()> {
    process::harden_for_swap()?;
    pin_near_gpu(plan);
    signals::install_supervisor_handlers();
    // The old server still serves (swap may need it to free the pages):
    // io buffers for the new servers may take a few tries, and they and
    // the new standby's fork may push pages out to swap (the mark survived
    // the execve; it is set again once the device is handed over or a
    // server dies: Supervisor::become_flusher).
    process::set_io_flusher(false, "the re-executed supervisor");
    let buffers = retried(RESUME_TRIES, RESUME_RETRY, || {
        QueueBuffers::allocate(&plan.device).map_err(anyhow::Error::from)
    })?;
    let held = Held {
        memory,
        buffers: std::sync::Arc::new(buffers),
    };
    log::info!(
        "supervisor: running {} now; {} stays with server {} until a standby of this binary is ready",
        upgrade::describe_binary(),
        bdev_path(state.id),
        state.server
    );
    let first = First::Inherited {
        server: state.server,
        restarts: state.restarts,
        lets_go: state.server_lets_go,
    };
    supervise_with(plan, run_dir, None, held, Some(state.id), first)
}

/// Runs this supervisor, and so every server it forks and their queue
/// threads, on the CPUs nearest the device's GPU; called before the io
/// buffers are allocated, so that they are placed on that node too.
fn pin_near_gpu(plan: &Plan) {
    let Some(place) = &plan.place else {
        return;
    };
    let Some(cpus) = &place.cpus else {
        return;
    };
    match locality::pin_to(cpus) {
        Ok(()) => log::info!(
            "supervisor: running on CPUs {cpus}, nearest GPU {} ({})",
            plan.gpu,
            place.describe()
        ),
        Err(e) => log::warn!("supervisor: {e:#}; running on every CPU"),
    }
}

/// Tries at the io buffers after re-executing, and the wait between.
const RESUME_TRIES: u32 = 20;
const RESUME_RETRY: Duration = Duration::from_millis(250);

/// Runs `f` up to `tries` times, `wait` apart, logging the first failure.
fn retried<T>(tries: u32, wait: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let mut n = 1;
    loop {
        match f() {
            Ok(t) => return Ok(t),
            Err(e) if n < tries => {
                if n == 1 {
                    log::warn!("supervisor: {e:#}; trying again");
                }
                n += 1;
                std::thread::sleep(wait);
            }
            Err(e) => return Err(e),
        }
    }
}

/// How a supervisor gets its first server.
enum First {
    /// Forks it.
    Fork(Launch),
    /// Has it already: the server of the binary it re-executed from,
    /// which it hands the device on from.
    Inherited {
        server: libc::pid_t,
        restarts: u32,
        lets_go: bool,
    },
}

fn supervise_with(
    plan: &Plan,
    run_dir: &Path,
    parent: Option<Reporter>,
    held: Held,
    id: Option<u32>,
    first: First,
) -> Result<()> {
    let mut sup = Supervisor {
        plan,
        run_dir,
        held,
        parent,
        id,
        standby: None,
        standby_forked: None,
        announced: None,
        cushion: None,
        down_since: None,
        restarts: 0,
        handover: None,
        stall: StallReporter::open(),
        io_flusher: false,
    };
    if !matches!(first, First::Inherited { .. }) {
        sup.become_flusher();
    }
    let result = match first {
        First::Fork(launch) => {
            sup.restarts = launch.restarts;
            sup.fork_server(launch, false)
                .and_then(|active| sup.supervise(active))
        }
        First::Inherited {
            server,
            restarts,
            lets_go,
        } => {
            sup.restarts = restarts;
            sup.handover = Some(Handover {
                old_server: server,
                lets_go,
                started: Instant::now(),
                stopped: None,
                successor: None,
                hurried: false,
            });
            sup.supervise(Child::inherited(server))
        }
    };
    // Whatever ended supervision, no line stays held.
    held_log::release();
    if let Some(s) = sup.standby.take() {
        crate::host::send_signal(s.pid as u32, rustix::process::Signal::TERM);
        let _ = wait_exit(s.pid, Duration::from_secs(5));
    }
    result
}

impl Supervisor<'_> {
    fn supervise(&mut self, mut active: Child) -> Result<()> {
        let mut failures = 0u32;
        loop {
            let run = self.watch(&mut active);
            // A server ended: the device may have none now.
            self.become_flusher();
            if !run.status.success() {
                // Until a server serves again, log lines wait in memory
                // set aside for them (held_log: a line could need a page).
                held_log::hold();
            }
            if let Some(next) = self.successor_of(run.pid) {
                // The old binary's server let go of the quiesced device (or
                // was killed when it could not be quiesced): its successor,
                // already woken, takes the device over.
                log::info!(
                    "supervisor: the old binary's server of {} (pid {}) stopped ({}); the new \
                     binary's server {} takes the device over",
                    self.id.map(bdev_path).unwrap_or_default(),
                    run.pid,
                    run.status,
                    next.pid
                );
                self.restarts += 1;
                self.down_since.get_or_insert_with(Instant::now);
                active = next;
                continue;
            }
            // A crash with a standby ready: wake it before anything here
            // allocates, since swap I/O may be waiting on the dead server
            // and memory be short until the standby serves.
            let mut woken = None;
            if let (Some(dev), false) = (self.id, run.status.success()) {
                let mut f = failures;
                // The swap question is not asked here (it reads a file,
                // which allocates): only a first failure, or a kill, wakes
                // the standby at once.
                let step = next_step(
                    &run,
                    true,
                    self.held.memory.survives_server(),
                    &mut f,
                    || true,
                );
                if step == Next::Restart(Duration::ZERO) {
                    woken = self.wake_standby(self.restarts + 1);
                }
                // Woken first: then said in the kernel's log (a crash, not
                // a kill).
                if !killed_by(run.status, libc::SIGKILL) {
                    self.stall
                        .server_ended(dev, run.pid, &run.status.to_string());
                }
            }
            let Some(dev) = self.id else {
                // The first server never brought the device up.
                let why = run.failure.unwrap_or_else(|| {
                    format!(
                        "the server exited ({}) before the device came up; see {}",
                        run.status,
                        self.plan.log.display()
                    )
                });
                if let Some(p) = self.parent.take() {
                    p.fail(&why);
                }
                bail!("{why}");
            };
            let exists = device_ids().contains(&dev);
            let survives = self.held.memory.survives_server();
            let path = bdev_path(dev);
            match next_step(&run, exists, survives, &mut failures, || {
                swap::find(&path).is_some()
            }) {
                Next::Done => {
                    held_log::release();
                    if let Some(w) = woken {
                        self.standby = Some(w);
                    }
                    log::info!("supervisor: {} is gone; exiting", bdev_path(dev));
                    DeviceRecord::remove(self.run_dir, dev);
                    return Ok(());
                }
                Next::GiveUp(why) => {
                    held_log::release();
                    if let Some(w) = woken {
                        self.standby = Some(w);
                    }
                    return self.give_up(dev, &why);
                }
                Next::Restart(wait) => {
                    if self.handing_over_from(run.pid) {
                        log::info!(
                            "supervisor: the old binary's server of {} (pid {}) stopped; the \
                             new binary's standby recovers the device",
                            bdev_path(dev),
                            run.pid
                        );
                    } else if failures > MAX_FAILURES {
                        log::error!(
                            "supervisor: the server of {path} (pid {}) died ({}), {failures} times \
                             in a row; {path} is swap, and removing it would fail the reads of \
                             every page swapped to it, so it is not given up yet: recovering \
                             it again in {} s, retry {} of {SWAP_RETRIES} (`vramblk del {dev}` \
                             takes it away)",
                            run.pid,
                            run.status,
                            wait.as_secs(),
                            failures - MAX_FAILURES
                        );
                    } else {
                        log::warn!(
                            "supervisor: the server of {path} (pid {}) died ({}); recovering it, \
                             try {failures} of {MAX_FAILURES}",
                            run.pid,
                            run.status
                        );
                    }
                    self.restarts += 1;
                    self.down_since.get_or_insert_with(Instant::now);
                    if let Some(w) = woken {
                        log::info!("supervisor: standby server {} took over", w.pid);
                        active = w;
                        continue;
                    }
                    if backoff(wait) {
                        log::info!("supervisor: restart requested by hand; failure count reset");
                        failures = 0;
                    }
                    active = self.take_over(dev, self.restarts)?;
                }
            }
        }
    }

    /// Tells a live standby to take over as restart number `restarts`;
    /// None if there is none, or none ready (that one is retired). Allocates
    /// nothing when it is ready (waitpid, a poll, an eventfd write).
    /// The next standby is forked as soon as the device is live again: the
    /// respawn limit is for standbys that die on their own, not for one
    /// that did its job (kills a few seconds apart would otherwise find
    /// none ready, and a server forked then must allocate while memory is
    /// short).
    fn wake_standby(&mut self, restarts: u32) -> Option<Child> {
        self.wake_standby_for(restarts, None)
    }

    /// As [`Self::wake_standby`]; with `from`, the standby first takes the
    /// device from that live server (an upgrade: handover.rs `take_from`).
    fn wake_standby_for(&mut self, restarts: u32, from: Option<libc::pid_t>) -> Option<Child> {
        let s = self.standby.take()?;
        self.standby_forked = None;
        if reap(s.pid).is_some() {
            return None;
        }
        if !s.is_ready() {
            // Still readying itself, and what it still needs (memory, when
            // it is short) may never come: the device would wait on it for
            // good, as a 7.3 run once did. A server forked now, with the
            // pages this supervisor set aside, is the surer way; SIGKILL
            // gets even a standby stuck in an allocation out (the kernel
            // lets a killed task use its reserves to exit).
            self.standby = Some(s);
            self.retire_standby("it was not ready yet when the device needed it");
            return None;
        }
        let go = s.go.as_ref()?;
        let word = crate::handover::word(restarts, from);
        (rustix::io::write(go, &word.to_ne_bytes()) == Ok(8)).then_some(s)
    }

    /// The standby takes over if it is alive; otherwise a new server is
    /// forked to recover.
    fn take_over(&mut self, dev: u32, restarts: u32) -> Result<Child> {
        if let Some(s) = self.wake_standby(restarts) {
            log::info!("supervisor: standby server {} takes over", s.pid);
            return Ok(s);
        }
        if self.standby.take().is_some() {
            log::warn!("supervisor: the standby server is gone");
        }
        let launch = Launch {
            start: Start::Recover(dev),
            restarts,
            foreground_swap: None,
            print_path: false,
        };
        // Memory may be exhausted now (swap waits on the device): give the
        // fork the pages set aside for it.
        drop(self.cushion.take());
        self.fork_server(launch, false)
    }

    /// Forks a server (or, with `standby`, one that waits on an eventfd for
    /// the word to take over).
    fn fork_server(&self, launch: Launch, standby: bool) -> Result<Child> {
        let (report, reporter) = process::report_pipe()?;
        let (go, ready) = if standby {
            (Some(process::eventfd()?), Some(process::eventfd()?))
        } else {
            (None, None)
        };
        // libc's fork, as in process::spawn (rustix has none for programs on
        // the C library).
        // SAFETY: the supervisor never starts a thread, so the child may run
        // arbitrary code after the fork.
        match unsafe { libc::fork() } {
            -1 => bail!("fork: {}", std::io::Error::last_os_error()),
            0 => {
                // A forked supervisor has it already; a foreground one
                // (`add --foreground`, the command's own process) does
                // not. Either way a panic here must never unwind into the
                // supervisor's code.
                crate::panics::abort_on_panic();
                vramblk_ublk_target::control::forget_inherited_control_ring();
                held_log::forget_parents_lines();
                drop(report);
                // Only the supervisor talks to `add` and to the standby.
                if let Some(p) = &self.parent {
                    p.close();
                }
                // The standby's wake-up eventfd is the supervisor's alone:
                // a server holding a copy could wake the standby by mistake.
                if let Some(fd) = self.standby.as_ref().and_then(|s| s.go.as_ref()) {
                    // SAFETY: closes this child's copy of the fd; the owner
                    // is never used or dropped here (the child exits).
                    unsafe { rustix::io::close(std::os::fd::AsRawFd::as_raw_fd(fd)) };
                }
                let standby = go
                    .zip(ready)
                    .map(|(go, ready)| server::Standby { go, ready });
                let code = server::main(
                    self.plan,
                    &self.held,
                    self.run_dir,
                    launch,
                    reporter,
                    standby,
                );
                std::process::exit(code);
            }
            pid => Ok(Child {
                pid,
                report: Some(report),
                go,
                ready,
                exited: pidfd_of(pid),
                already_live: false,
            }),
        }
    }

    /// Ends the standby, for `why`; the next one is forked at once. It
    /// serves nothing yet, so SIGKILL loses nothing.
    fn retire_standby(&mut self, why: &str) {
        if let Some(s) = self.standby.take() {
            crate::host::send_signal(s.pid as u32, rustix::process::Signal::KILL);
            let _ = wait_exit(s.pid, Duration::from_secs(5));
            log::info!("supervisor: standby server {} retired ({why})", s.pid);
        }
        self.standby_forked = None;
    }

    /// Keeps a standby ready once the device is live, and the cushion
    /// for a server forked without one.
    fn ensure_standby(&mut self, dev: u32) {
        if !self.held.memory.survives_server() {
            return;
        }
        if self.cushion.is_none() {
            self.cushion = Some(process::Cushion::new(SUPERVISOR_CUSHION_BYTES));
        }
        if let Some(s) = &self.standby {
            if let Some(status) = reap(s.pid) {
                log::warn!("supervisor: standby server {} exited ({status})", s.pid);
                self.standby = None;
            }
        }
        if self.standby.is_some()
            || self
                .standby_forked
                .is_some_and(|t| t.elapsed() < STANDBY_RESPAWN)
        {
            return;
        }
        let launch = Launch {
            start: Start::Recover(dev),
            restarts: 0,
            foreground_swap: None,
            print_path: false,
        };
        self.standby_forked = Some(Instant::now());
        match self.fork_server(launch, true) {
            Ok(c) => {
                log::info!("supervisor: standby server {} ready", c.pid);
                self.standby = Some(c);
            }
            Err(e) => log::warn!("supervisor: no standby server: {e:#}"),
        }
    }

    /// Follows the active server to its end: relays its first report to
    /// `add`, records the device id, keeps a standby, handles stop requests.
    fn watch(&mut self, server: &mut Child) -> Run {
        let mut live_since: Option<Instant> = server.already_live.then(Instant::now);
        let mut failure = None;
        let mut stop_handled = false;
        loop {
            // Wakes for the report, for the server's death, or at the tick
            // (stop requests, the standby, the handoff channel).
            let [reported, _] =
                process::wait_readable(&[server.report.as_ref(), server.exited.as_ref()], TICK_MS);
            // Only a report that is there is taken: dropping the pipe
            // unread would lose it.
            let report = if reported { server.report.take() } else { None };
            if let Some(fd) = report {
                match process::read_report(fd, &self.plan.log) {
                    Ok(dev) => {
                        held_log::release();
                        if let Some(h) = self.handover.take() {
                            log::info!(
                                "supervisor: {} upgraded: served by {} (server {}) {:.2} s after \
                                 the old server stopped, {:.2} s after the upgrade began",
                                bdev_path(dev),
                                upgrade::describe_binary(),
                                server.pid,
                                h.stopped.map_or(0.0, |t| t.elapsed().as_secs_f64()),
                                h.started.elapsed().as_secs_f64()
                            );
                        }
                        if self.id.is_some() {
                            self.stall.served();
                            let down = self.down_since.take().map(|t| t.elapsed());
                            log::info!(
                                "supervisor: {} recovered{}",
                                bdev_path(dev),
                                down.map(|d| format!(
                                    " {:.2} s after its server exited",
                                    d.as_secs_f64()
                                ))
                                .unwrap_or_default()
                            );
                        }
                        self.id = Some(dev);
                        live_since = Some(Instant::now());
                        if let Some(p) = self.parent.take() {
                            p.live(dev);
                        }
                    }
                    Err(e) => {
                        held_log::release();
                        failure = Some(format!("{e:#}"))
                    }
                }
            }
            // Before looking for the server's end: a handoff it sent just
            // before dying still counts.
            match self.held.memory.take_handoff() {
                Ok(true) => {
                    self.announced = None;
                    // A standby imported the VRAM as it was; after a change
                    // (VRAM given back or taken back) it would hold freed
                    // chunks and miss new ones, so a new one imports what
                    // is held now.
                    self.retire_standby("the VRAM changed");
                }
                Ok(false) => {}
                Err(e) => log::warn!("supervisor: {e:#}"),
            }
            if let (Some(_), Some(dev)) = (live_since, self.id) {
                let now = announce::service_socket();
                if now.is_some() && now != self.announced && self.held.memory.survives_server() {
                    announce::announce(dev, &self.held.memory.fds());
                    self.announced = now;
                }
            }
            if let (Some(since), Some(dev)) = (self.down_since, self.id) {
                self.stall.check(dev, since, server.pid);
            }
            if let Some(status) = reap(server.pid) {
                return Run {
                    pid: server.pid,
                    status,
                    live_for: live_since.map(|t| t.elapsed()),
                    failure,
                };
            }
            if let (Some(_), Some(dev)) = (live_since, self.id) {
                if signals::stop_requested() {
                    if !stop_handled {
                        stop_handled = stop(dev);
                    }
                } else {
                    self.ensure_standby(dev);
                    if signals::take_upgrade_request() {
                        self.re_execute(dev, server.pid);
                    }
                    self.continue_handover(dev, server.pid);
                    self.hurry_old_server(dev, server.pid);
                }
            }
        }
    }

    /// The server woken to take the device from `pid`, if `pid` is the old
    /// binary's server of an upgrade under way.
    fn successor_of(&mut self, pid: libc::pid_t) -> Option<Child> {
        let h = self.handover.as_mut()?;
        if h.old_server != pid {
            return None;
        }
        h.successor.take()
    }

    /// From here on, no allocation of the supervisor may write swap out to
    /// the device it supervises (process::set_io_flusher says why): from
    /// the start, or for a supervisor re-executed for an upgrade, once it
    /// stops the old server or a server dies. Before that the old server
    /// serves, and an allocation that waits for a page (the new standby's
    /// fork, with memory exhausted) had better write one out to swap than
    /// wait for kswapd alone (seen on 7.3: a 10 s stall in fork).
    fn become_flusher(&mut self) {
        if !self.io_flusher {
            process::set_io_flusher(true, "the supervisor");
            self.io_flusher = true;
        }
    }

    /// Whether `pid` is the old binary's server an upgrade stopped.
    fn handing_over_from(&self, pid: libc::pid_t) -> bool {
        self.handover
            .as_ref()
            .is_some_and(|h| h.old_server == pid && h.stopped.is_some())
    }

    /// `vramblk upgrade` asked: becomes the binary now on disk, keeping
    /// this pid, the children and the memory (upgrade.rs). Returns only if
    /// that failed; the device keeps its server either way.
    fn re_execute(&mut self, dev: u32, server: libc::pid_t) {
        if self.handover.is_some() {
            log::warn!(
                "supervisor: an upgrade of {} is under way already",
                bdev_path(dev)
            );
            return;
        }
        // The standby waits on an eventfd the new image would not have:
        // it goes, and the new binary forks its own.
        self.retire_standby("the supervisor re-executes");
        let e = match ResumeState::new(
            dev,
            server,
            self.restarts,
            self.plan.reserve,
            &self.held.memory,
        ) {
            Ok(state) => upgrade::re_execute(&state, self.run_dir),
            Err(e) => e,
        };
        log::error!(
            "supervisor: upgrading {}: {e:#}; the running binary keeps serving it",
            bdev_path(dev)
        );
    }

    /// After re-executing: once a standby of this binary is ready, hands
    /// it the device (it quiesces the device and takes it over) or, where
    /// the old server would stop a quiesced device, kills that server (the
    /// standby then takes over as after a crash); gives the upgrade up if
    /// no standby gets ready in time.
    fn continue_handover(&mut self, dev: u32, server: libc::pid_t) {
        let Some(h) = &self.handover else {
            return;
        };
        if h.stopped.is_some() || h.old_server != server {
            return;
        }
        let (lets_go, started) = (h.lets_go, h.started);
        let Some(standby) = self
            .standby
            .as_ref()
            .filter(|s| s.is_ready())
            .map(|s| s.pid)
        else {
            if started.elapsed() > HANDOVER_PATIENCE {
                self.become_flusher();
                log::error!(
                    "supervisor: no standby of the new binary got ready in {} s; {} stays with \
                     the old server {server}",
                    HANDOVER_PATIENCE.as_secs(),
                    bdev_path(dev)
                );
                self.handover = None;
            }
            return;
        };
        // The device is about to go unserved for a moment.
        self.become_flusher();
        if lets_go {
            log::info!(
                "supervisor: standby {standby} of the new binary is ready; it takes {} from the \
                 old server {server}",
                bdev_path(dev)
            );
            // It quiesces the device (or kills the old server where the
            // kernel cannot), then recovers it; the old server's end is
            // then no crash (supervise, successor_of). The old server holds
            // its last log lines meanwhile (signals::HANDOVER_SIGNAL).
            crate::host::send_signal(server as u32, signals::HANDOVER_SIGNAL);
            // The device goes unserved once quiesced: lines wait in memory
            // set aside for them until the standby serves (held_log).
            held_log::hold();
            let woken = self.wake_standby_for(self.restarts + 1, Some(server));
            if woken.is_none() {
                held_log::release();
            }
            if let Some(h) = &mut self.handover {
                h.stopped = woken.is_some().then(Instant::now);
                h.successor = woken;
            }
            return;
        }
        log::info!(
            "supervisor: standby {standby} of the new binary is ready; stopping the old server \
             {server} of {} (its binary would stop a quiesced device)",
            bdev_path(dev)
        );
        if let Some(h) = &mut self.handover {
            h.stopped = Some(Instant::now());
        }
        // The kernel requeues what the server held (user recovery with
        // reissue), exactly as after a crash.
        crate::host::send_signal(server as u32, rustix::process::Signal::KILL);
    }

    /// Kills the old binary's server if it has not let go of the device
    /// LET_GO_PATIENCE after its successor was woken to quiesce it (the
    /// successor then recovers the device as after a crash).
    fn hurry_old_server(&mut self, dev: u32, server: libc::pid_t) {
        let Some(h) = &mut self.handover else {
            return;
        };
        let late = h
            .stopped
            .is_some_and(|t| t.elapsed() > handover::LET_GO_PATIENCE);
        if h.old_server != server || h.successor.is_none() || h.hurried || !late {
            return;
        }
        h.hurried = true;
        log::warn!(
            "supervisor: the old server {server} did not let go of {} within {} s of the \
             hand-over; killing it",
            bdev_path(dev),
            handover::LET_GO_PATIENCE.as_secs()
        );
        crate::host::send_signal(server as u32, rustix::process::Signal::KILL);
    }

    /// Removes the device so the I/O waiting on it fails rather than hangs.
    fn give_up(&self, id: u32, why: &str) -> Result<()> {
        let path = bdev_path(id);
        log::error!(
            "supervisor: giving up on {path}: {why}; removing it so its I/O fails instead of \
             waiting forever (anything swapped to it is lost)"
        );
        if let Err(e) = delete_device_nowait(id) {
            log::error!("supervisor: removing {path}: {e}");
        }
        DeviceRecord::remove(self.run_dir, id);
        Err(anyhow!("gave up on {path}: {why}"))
    }
}

/// Sleeps up to `wait`, or less if `vramblk recover` or a stop request
/// arrives; returns whether a recover request came.
fn backoff(wait: Duration) -> bool {
    let until = Instant::now() + wait;
    while Instant::now() < until {
        if signals::take_recover_request() {
            return true;
        }
        if signals::stop_requested() {
            // Stopping needs a server: swapoff reads every page back.
            return false;
        }
        std::thread::sleep(Duration::from_millis(TICK_MS as u64));
    }
    signals::take_recover_request()
}

/// SIGTERM/SIGINT: swap off, then remove the device (the server then
/// exits). If swapoff fails (RAM too short to take the pages back), the
/// device keeps serving: dropping swapped pages kills their processes.
fn stop(id: u32) -> bool {
    let path = bdev_path(id);
    log::info!("supervisor: stop requested; taking {path} down");
    if swap::find(&path).is_some() {
        if let Err(e) = swap::disable(&path) {
            log::error!("supervisor: {e:#}; {path} keeps serving");
            return true;
        }
    }
    if let Err(e) = delete_device(id) {
        log::error!("supervisor: removing {path}: {e}");
    }
    true
}

/// How a child ended: std's own type (built from the raw wait status), so
/// the log says it the way Rust programs do ("signal: 9 (SIGKILL)",
/// "exit status: 3").
type ExitStatus = std::process::ExitStatus;

fn killed_by(status: ExitStatus, signal: libc::c_int) -> bool {
    status.signal() == Some(signal)
}

/// A pidfd for our child `pid`; None where the kernel has no pidfd_open
/// (before 5.3), and the supervisor's tick finds the death instead.
fn pidfd_of(pid: libc::pid_t) -> Option<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid)?;
    match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => Some(fd),
        Err(e) => {
            log::debug!("pidfd_open: {e}; a server's death is seen at the next tick");
            None
        }
    }
}

fn reap(pid: libc::pid_t) -> Option<ExitStatus> {
    let child = rustix::process::Pid::from_raw(pid)?;
    match rustix::process::waitpid(Some(child), rustix::process::WaitOptions::NOHANG) {
        Ok(Some((_, status))) => Some(ExitStatus::from_raw(status.as_raw())),
        Ok(None) | Err(rustix::io::Errno::INTR) => None,
        // Not our child any more (cannot happen unless SIGCHLD is ignored):
        // count it as a failed exit rather than watch forever.
        Err(_) => Some(ExitStatus::from_raw(255 << 8)),
    }
}

fn wait_exit(pid: libc::pid_t, limit: Duration) -> Option<ExitStatus> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if let Some(s) = reap(pid) {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(TICK_MS as u64));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(status: libc::c_int, live_for: Option<u64>) -> Run {
        Run {
            pid: 1,
            status: ExitStatus::from_raw(status),
            live_for: live_for.map(Duration::from_secs),
            failure: None,
        }
    }

    /// The device is not swap (it may be given up).
    fn no_swap() -> bool {
        false
    }

    const KILLED: libc::c_int = libc::SIGKILL;
    const CRASHED: libc::c_int = libc::SIGABRT;
    const EXIT_0: libc::c_int = 0;

    #[test]
    fn a_clean_exit_or_a_deleted_device_ends_supervision() {
        let mut f = 0;
        assert_eq!(
            next_step(&run(EXIT_0, Some(5)), true, true, &mut f, no_swap),
            Next::Done
        );
        assert_eq!(
            next_step(&run(KILLED, Some(5)), false, true, &mut f, no_swap),
            Next::Done
        );
        assert_eq!(f, 0);
    }

    #[test]
    fn crashes_restart_with_growing_waits_then_give_up() {
        for failing in [CRASHED, 1 << 8] {
            let mut f = 0;
            let waits: Vec<Next> = (0..MAX_FAILURES)
                .map(|_| next_step(&run(failing, None), true, true, &mut f, no_swap))
                .collect();
            assert_eq!(waits[0], Next::Restart(Duration::ZERO));
            assert_eq!(waits[4], Next::Restart(Duration::from_secs(4)));
            match next_step(&run(failing, Some(2)), true, true, &mut f, no_swap) {
                Next::GiveUp(why) => assert!(why.contains("died 5 times in a row"), "{why}"),
                other => panic!("expected to give up, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_swap_device_is_retried_for_minutes_before_it_is_given_up() {
        for failing in [CRASHED, 1 << 8] {
            let mut f = 0;
            let asked = std::cell::Cell::new(0);
            let is_swap = || {
                asked.set(asked.get() + 1);
                true
            };
            for _ in 0..MAX_FAILURES {
                next_step(&run(failing, None), true, true, &mut f, is_swap);
            }
            assert_eq!(
                asked.get(),
                0,
                "asked only once the run is long enough to give up"
            );
            for n in 1..=SWAP_RETRIES {
                assert_eq!(
                    next_step(&run(failing, None), true, true, &mut f, is_swap),
                    Next::Restart(SWAP_RETRY),
                    "failure {} of a swap device",
                    MAX_FAILURES + n
                );
            }
            assert_eq!(asked.get(), SWAP_RETRIES);
            assert!(SWAP_RETRY * SWAP_RETRIES >= Duration::from_secs(300));
            match next_step(&run(failing, None), true, true, &mut f, is_swap) {
                Next::GiveUp(why) => assert!(why.contains("died 35 times in a row"), "{why}"),
                other => panic!("expected to give up at last, got {other:?}"),
            }
            // A server that serves for a while in between starts the count
            // again.
            let mut f = MAX_FAILURES + 7;
            assert_eq!(
                next_step(&run(failing, Some(31)), true, true, &mut f, is_swap),
                Next::Restart(Duration::ZERO)
            );
            assert_eq!(f, 1);
        }
        // Its memory gone with the server, there is nothing left to keep.
        let mut f = MAX_FAILURES + 3;
        assert!(matches!(
            next_step(&run(CRASHED, None), true, false, &mut f, || true),
            Next::GiveUp(_)
        ));
    }

    #[test]
    fn sigkills_are_always_recovered_at_once_and_never_counted() {
        let mut f = 3;
        for live_for in [None, Some(0), Some(2)].into_iter().cycle().take(100) {
            assert_eq!(
                next_step(&run(KILLED, live_for), true, true, &mut f, no_swap),
                Next::Restart(Duration::ZERO)
            );
        }
        assert_eq!(f, 3, "SIGKILLs leave the count of crashes as it was");
        assert_eq!(
            next_step(&run(CRASHED, None), true, true, &mut f, no_swap),
            Next::Restart(Duration::from_secs(2))
        );
    }

    #[test]
    fn a_crash_loop_still_gives_up_between_sigkills() {
        let mut f = 0;
        for _ in 0..MAX_FAILURES {
            next_step(&run(CRASHED, None), true, true, &mut f, no_swap);
            next_step(&run(KILLED, None), true, true, &mut f, no_swap);
        }
        match next_step(&run(CRASHED, None), true, true, &mut f, no_swap) {
            Next::GiveUp(why) => assert!(why.contains("died 5 times in a row"), "{why}"),
            other => panic!("expected to give up, got {other:?}"),
        }
    }

    #[test]
    fn a_server_that_served_a_while_resets_the_count() {
        let mut f = 4;
        assert_eq!(
            next_step(&run(CRASHED, Some(31)), true, true, &mut f, no_swap),
            Next::Restart(Duration::ZERO)
        );
        assert_eq!(f, 1);
    }

    #[test]
    fn lost_memory_gives_up_at_once() {
        let mut f = 0;
        assert!(matches!(
            next_step(&run(KILLED, Some(100)), true, false, &mut f, no_swap),
            Next::GiveUp(_)
        ));
    }

    #[test]
    fn resume_retries_then_gives_the_last_error() {
        let mut calls = 0;
        let got = retried(5, Duration::ZERO, || {
            calls += 1;
            if calls < 3 {
                bail!("short of memory")
            } else {
                Ok(calls)
            }
        });
        assert_eq!(got.unwrap(), 3);
        let mut calls = 0;
        let e = retried(4, Duration::ZERO, || -> Result<()> {
            calls += 1;
            bail!("try {calls}")
        });
        assert_eq!(e.unwrap_err().to_string(), "try 4");
    }

    #[test]
    fn exit_statuses_read_well() {
        assert_eq!(
            ExitStatus::from_raw(KILLED).to_string(),
            "signal: 9 (SIGKILL)"
        );
        assert_eq!(ExitStatus::from_raw(3 << 8).to_string(), "exit status: 3");
        assert!(ExitStatus::from_raw(0).success());
        assert!(killed_by(ExitStatus::from_raw(KILLED), libc::SIGKILL));
        assert!(!killed_by(ExitStatus::from_raw(CRASHED), libc::SIGKILL));
    }
}
