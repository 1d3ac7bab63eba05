//! `vramblk service`: what systemd runs. Brings the configured devices up
//! as swap, tells systemd it is ready, then keeps them in step with the
//! power and VRAM-pressure policies until it is stopped, when it takes them
//! down (a device whose pages RAM cannot take back keeps serving: its
//! supervisor is a separate process that the stop does not kill).
//!
//! The service never touches CUDA: free VRAM comes from NVML.

use crate::gpu::Gpus;
use crate::release;
use crate::up::{bring_up, configured_devices, take_down};
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vramblk_config::{format_size, parse_size, store_json, Backend, Config, RUN_DIR};
use vramblk_daemon::holder::Holder;
use vramblk_daemon::host::{require_driver, require_root};
use vramblk_daemon::notify::{listen_fds, notify};
use vramblk_daemon::vram_control::{self, Command, VramReply};
use vramblk_daemon::{signals, upgrade};
use vramblk_policy::{PowerGate, PowerReading, PressureAction, PressureGate, VramReading};

/// How often VRAM pressure is looked at (NVML reads are cheap).
const PRESSURE_POLL: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_millis(200);

/// What `vramblk status` shows of the service.
#[derive(Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ServiceState {
    pub pid: u32,
    pub power: String,
    /// Per GPU: "holding", "released ...".
    pub pressure: BTreeMap<u32, String>,
    /// Configured devices the policies keep down now, by their place in
    /// the config's devices (one per GPU of an entry over several).
    pub held_down: Vec<usize>,
    /// Devices whose memory the service holds too (and systemd's fd
    /// store, under systemd), so they outlive their supervisor.
    #[serde(default)]
    pub holding: Vec<u32>,
}

impl ServiceState {
    pub fn path() -> PathBuf {
        Path::new(RUN_DIR).join("service.json")
    }

    pub fn load() -> Option<ServiceState> {
        let text = std::fs::read_to_string(Self::path()).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn store(&self) {
        let path = Self::path();
        if let Err(e) = store_json(&path, self) {
            log::warn!("could not write {}: {e}", path.display());
        }
    }
}

/// Free VRAM per GPU index: from NVML, or from files a test writes; None
/// when NVML is not there (then the pressure policy does nothing).
enum FreeVram {
    Nvml(Option<Box<Gpus>>),
    /// `DIR/<index>` holds a size ("6G").
    Files(PathBuf),
}

impl FreeVram {
    fn open(wanted: bool, files: Option<PathBuf>) -> FreeVram {
        if let Some(dir) = files {
            return FreeVram::Files(dir);
        }
        if !wanted {
            return FreeVram::Nvml(None);
        }
        match Gpus::open() {
            Ok(g) => FreeVram::Nvml(Some(Box::new(g))),
            Err(e) => {
                log::warn!("service: VRAM pressure is off: {e}");
                FreeVram::Nvml(None)
            }
        }
    }

    fn free(&self, gpu: u32) -> Option<u64> {
        let read = match self {
            FreeVram::Nvml(gpus) => gpus
                .as_ref()?
                .info(gpu)
                .map(|g| g.free)
                .map_err(|e| e.to_string()),
            FreeVram::Files(dir) => {
                let path = dir.join(gpu.to_string());
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))
                    .and_then(|t| {
                        parse_size(t.trim()).map_err(|e| format!("{}: {e}", path.display()))
                    })
            }
        };
        match read {
            Ok(free) => Some(free),
            Err(e) => {
                log::warn!("service: free VRAM of GPU {gpu}: {e}");
                None
            }
        }
    }
}

/// Collects the exit status of supervisors that ended (their devices were
/// taken down), so they do not stay as zombies. Only called between
/// commands: nothing else of this thread waits for a child then.
fn reap_children() {
    while let Ok(Some((pid, _))) =
        rustix::process::waitpid(None, rustix::process::WaitOptions::NOHANG)
    {
        log::debug!("service: supervisor {} ended", pid.as_raw_nonzero());
    }
}

pub struct ServiceArgs {
    pub config: PathBuf,
    /// Where /sys is (tests point it at a fake power-supply tree).
    pub sysfs: PathBuf,
    /// Where free VRAM is read from instead of NVML (tests).
    pub free_vram_from: Option<PathBuf>,
}

pub fn run(a: &ServiceArgs) -> Result<()> {
    // First: they are the fds 3, 4, ... that nothing else may take.
    let handed_back = listen_fds();
    require_root("service")?;
    require_driver()?;
    vramblk_daemon::init_logging(env_logger::Target::Stderr);
    let config = crate::gpu::one_device_per_gpu(Config::load(&a.config)?)?;
    signals::install_service_handlers();
    std::fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
    let holder = Holder::open(Path::new(RUN_DIR), handed_back)?;
    let vram = FreeVram::open(config.pressure.enabled, a.free_vram_from.clone());
    let mut svc = Service::new(config, a.sysfs.clone(), holder, vram);
    // Devices whose supervisor died with the last service are adopted
    // before `up` could take their entries for missing.
    svc.holder.tick();
    svc.start()?;
    let up = configured_devices(Path::new(RUN_DIR)).len();
    notify(&format!(
        "READY=1\nSTATUS={up} of {} device(s) up; power: {}",
        svc.config.devices.len(),
        svc.state.power
    ));
    log::info!("service: ready, {up} device(s) up");
    svc.watch();
    log::info!("service: stopping; taking the devices down");
    notify("STOPPING=1");
    let _ = std::fs::remove_file(ServiceState::path());
    let result = take_down(|_| true).context("stopping");
    // Lets go of what was removed; a device left serving stays with its
    // supervisor.
    svc.holder.tick();
    result
}

/// The configured entries of `entries` that are live now, by device id,
/// with what each holds (from its server; a server that does not answer
/// is left out).
fn live_vram(entries: &[usize]) -> Vec<(u32, VramReply)> {
    let run_dir = Path::new(RUN_DIR);
    crate::del::vramblk_records(run_dir)
        .into_iter()
        .filter(|r| r.backend == Backend::Cuda && r.origin.is_some_and(|o| entries.contains(&o)))
        .filter_map(|r| {
            vram_control::request(run_dir, r.id, Command::Usage)
                .ok()
                .map(|u| (r.id, u))
        })
        .collect()
}

struct Service {
    config: Config,
    sysfs: PathBuf,
    power: PowerGate,
    power_up: bool,
    pressure: BTreeMap<u32, PressureGate>,
    vram: FreeVram,
    state: ServiceState,
    holder: Holder,
}

impl Service {
    fn new(config: Config, sysfs: PathBuf, holder: Holder, vram: FreeVram) -> Service {
        let gpus: BTreeSet<u32> = config
            .devices
            .iter()
            .filter(|d| d.backend == Backend::Cuda)
            .filter_map(|d| d.gpu.single())
            .collect();
        let pressure = gpus
            .into_iter()
            .map(|g| (g, PressureGate::new(config.pressure.clone())))
            .collect();
        Service {
            power: PowerGate::new(config.power.clone()),
            power_up: true,
            pressure,
            vram,
            state: ServiceState {
                pid: vramblk_daemon::host::own_pid(),
                ..ServiceState::default()
            },
            config,
            sysfs,
            holder,
        }
    }

    /// Entries the pressure policy holds down now.
    fn released(&self) -> BTreeSet<usize> {
        self.config
            .devices
            .iter()
            .enumerate()
            .filter(|(_, d)| {
                d.backend == Backend::Cuda
                    && d.gpu
                        .single()
                        .and_then(|g| self.pressure.get(&g))
                        .is_some_and(|g| g.released())
            })
            .map(|(i, _)| i)
            .collect()
    }

    fn start(&mut self) -> Result<()> {
        let reading = PowerReading::read(&self.sysfs);
        self.power_up = self.power.allows(&reading);
        self.state.power = reading.describe();
        self.publish();
        if !self.power_up {
            log::info!(
                "service: {}: the devices stay down until on AC",
                reading.describe()
            );
            return Ok(());
        }
        bring_up(&self.config, |_| true)?;
        Ok(())
    }

    fn watch(&mut self) {
        let mut next_power = Instant::now() + Duration::from_secs(self.config.power.poll_secs);
        let mut next_pressure = Instant::now();
        while !signals::stop_requested() {
            std::thread::sleep(TICK);
            if signals::take_upgrade_request() {
                self.re_execute();
            }
            reap_children();
            self.holder.tick();
            if self.holder.held() != self.state.holding {
                self.publish();
            }
            let now = Instant::now();
            if signals::take_poll_request() || now >= next_power {
                next_power = now + Duration::from_secs(self.config.power.poll_secs.max(1));
                self.check_power();
            }
            if now >= next_pressure {
                next_pressure = now + PRESSURE_POLL;
                self.check_pressure(now);
            }
        }
    }

    /// `vramblk upgrade` asked: becomes the binary now on disk, handing it
    /// the memory fds held (daemon/src/upgrade.rs). The supervisors, its
    /// children, stay; the new image adopts none of them, as they live.
    fn re_execute(&mut self) {
        let path = match upgrade::binary_on_disk() {
            Ok(p) => p,
            Err(e) => {
                log::error!("service: not upgrading: {e:#}");
                return;
            }
        };
        let e = upgrade::re_execute_service(&path, &self.holder.named_fds());
        // The held fds may have been moved: exit, and systemd restarts the
        // service with them from its fd store (ExecStop leaves the devices
        // serving after a failure).
        log::error!("service: re-executing {}: {e:#}; exiting", path.display());
        std::process::exit(1);
    }

    fn check_power(&mut self) {
        let reading = PowerReading::read(&self.sysfs);
        let allowed = self.power.allows(&reading);
        self.state.power = reading.describe();
        if allowed != self.power_up {
            self.power_up = allowed;
            if allowed {
                log::info!("service: {}: bringing the devices back", reading.describe());
                let released = self.released();
                if let Err(e) = bring_up(&self.config, |i| !released.contains(&i)) {
                    log::error!("service: {e:#}");
                }
            } else {
                log::info!("service: {}: taking the devices down", reading.describe());
                if let Err(e) = take_down(|_| true) {
                    // Retried at the next look: the gate says down, the
                    // devices are still up.
                    log::error!("service: {e:#}; trying again at the next power check");
                    self.power_up = true;
                }
            }
        }
        self.publish();
    }

    fn check_pressure(&mut self, now: Instant) {
        if !self.config.pressure.enabled {
            return;
        }
        let gpus: Vec<u32> = self.pressure.keys().copied().collect();
        for gpu in gpus {
            let Some(free) = self.vram.free(gpu) else {
                continue;
            };
            let on_gpu: Vec<usize> = self
                .config
                .devices
                .iter()
                .enumerate()
                .filter(|(_, d)| d.backend == Backend::Cuda && d.gpu.single() == Some(gpu))
                .map(|(i, _)| i)
                .collect();
            let sizes: u64 = on_gpu.iter().map(|&i| self.config.devices[i].size).sum();
            let live = live_vram(&on_gpu);
            let Some(gate) = self.pressure.get_mut(&gpu) else {
                continue;
            };
            let reading = VramReading {
                free,
                unused: live.iter().map(|(_, u)| u.unused).sum(),
                to_take: if gate.released() {
                    sizes
                } else {
                    live.iter()
                        .map(|(_, u)| u.full.saturating_sub(u.held))
                        .sum()
                },
            };
            let floor = self.config.pressure.min_free_vram;
            let action = gate.step(reading, now);
            if action != PressureAction::Nothing {
                // Said before acting: whoever sees the device change (swap
                // off, nodes gone, swap back on) reads the state that caused it.
                self.publish();
            }
            match action {
                PressureAction::Nothing => {}
                PressureAction::Trim => {
                    log::warn!(
                        "service: GPU {gpu} has {} free, under the {} threshold: its devices give back the VRAM that holds no data ({})",
                        format_size(free),
                        format_size(floor),
                        format_size(reading.unused)
                    );
                    for (id, _) in &live {
                        match release::give_back(Path::new(RUN_DIR), *id, 0, floor) {
                            Ok(r) => log::info!(
                                "service: /dev/ublkb{id} {}",
                                release::describe_give_back(&r)
                            ),
                            Err(e) => log::error!("service: /dev/ublkb{id}: {e:#}"),
                        }
                    }
                }
                PressureAction::TakeBack => {
                    log::info!(
                        "service: GPU {gpu} has {} free for {} s: its devices take their VRAM back",
                        format_size(free),
                        self.config.pressure.calm_secs
                    );
                    for (id, u) in &live {
                        let cmd = Command::TakeBack { to: u.full, floor };
                        match vram_control::request(Path::new(RUN_DIR), *id, cmd) {
                            Ok(r) if r.ok => log::info!(
                                "service: /dev/ublkb{id} holds {} of VRAM again",
                                format_size(r.held)
                            ),
                            Ok(r) => log::error!(
                                "service: /dev/ublkb{id}: {}",
                                r.error.unwrap_or_default()
                            ),
                            Err(e) => log::error!("service: /dev/ublkb{id}: {e:#}"),
                        }
                    }
                }
                PressureAction::Release => {
                    log::warn!(
                        "service: GPU {gpu} has {} free, under the {} threshold: giving its VRAM back (swapoff, then remove)",
                        format_size(free),
                        format_size(self.config.pressure.min_free_vram)
                    );
                    if let Err(e) = take_down(|i| on_gpu.contains(&i)) {
                        log::error!("service: {e:#}; keeping GPU {gpu}'s devices and trying again");
                        if let Some(gate) = self.pressure.get_mut(&gpu) {
                            gate.release_refused();
                        }
                    }
                }
                PressureAction::Restore => {
                    log::info!(
                        "service: GPU {gpu} has {} free for {} s: bringing its devices back",
                        format_size(free),
                        self.config.pressure.calm_secs
                    );
                    if self.power_up {
                        if let Err(e) = bring_up(&self.config, |i| on_gpu.contains(&i)) {
                            log::error!("service: {e:#}");
                        }
                    }
                }
            }
        }
        self.publish();
    }

    fn publish(&mut self) {
        self.state.pressure = self
            .pressure
            .iter()
            .map(|(g, p)| {
                let text = if self.config.pressure.enabled {
                    p.describe().to_string()
                } else {
                    "off".into()
                };
                (*g, text)
            })
            .collect();
        let mut held: BTreeSet<usize> = self.released();
        if !self.power_up {
            held.extend(0..self.config.devices.len());
        }
        self.state.held_down = held.into_iter().collect();
        self.state.holding = self.holder.held();
        self.state.store();
    }
}
