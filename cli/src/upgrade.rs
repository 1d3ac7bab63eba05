//! `vramblk upgrade`: hand live devices, and the service's main process, to
//! the binary now on disk, swap left on (their side: daemon/src/upgrade.rs).

use crate::args::UpgradeArgs;
use crate::del::{vramblk_record, vramblk_records};
use crate::service::ServiceState;
use anyhow::{bail, Result};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};
use vramblk_config::{DeviceRecord, RUN_DIR};
use vramblk_daemon::host::{pid_alive, require_driver, require_root, send_signal};
use vramblk_daemon::signals::{handles_upgrade, UPGRADE_SIGNAL};
use vramblk_daemon::upgrade::runs_replaced_binary;
use vramblk_ublk_target::control::{bdev_path, device_info};
use vramblk_ublk_target::DeviceState;

/// How long one device may take: a standby of the new binary gets ready
/// (60 s at most, supervise.rs), then takes over.
const WAIT: Duration = Duration::from_secs(90);
/// How long a supervisor may take to execute the new binary (an execve
/// and a few file reads).
const EXEC_WITHIN: Duration = Duration::from_secs(10);

pub fn run(a: &UpgradeArgs) -> Result<()> {
    require_root("upgrade")?;
    require_driver()?;
    let run_dir = Path::new(RUN_DIR);
    let records: Vec<DeviceRecord> = if a.ids.is_empty() {
        vramblk_records(run_dir)
    } else {
        a.ids
            .iter()
            .map(|&id| vramblk_record(run_dir, id))
            .collect::<Result<_>>()?
    };
    if records.is_empty() {
        println!("no vramblk devices to upgrade");
    }
    let mut failed = 0;
    for record in &records {
        match upgrade_one(run_dir, record, a.force) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("vramblk: {}: {e:#}", bdev_path(record.id));
                failed += 1;
            }
        }
    }
    // The service last: a supervisor it adopts a device with from now on
    // is forked from the new binary.
    if a.ids.is_empty() {
        match upgrade_service(a.force) {
            Ok(Some(line)) => println!("{line}"),
            Ok(None) => {}
            Err(e) => {
                eprintln!("vramblk: the service: {e:#}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} upgrade(s) failed; what failed keeps running the binary it had");
    }
    Ok(())
}

/// Asks the service's main process, if one runs, to re-execute the binary
/// on disk, and waits until the new image has started; the line to print.
fn upgrade_service(force: bool) -> Result<Option<String>> {
    let Some(pid) = ServiceState::load()
        .map(|s| s.pid)
        .filter(|&p| pid_alive(p))
    else {
        return Ok(None);
    };
    if !handles_upgrade(pid) {
        bail!("its main process (pid {pid}) runs a vramblk without upgrades; restart it");
    }
    if !force && !runs_replaced_binary(pid) {
        return Ok(Some(format!(
            "service (pid {pid}): runs the binary on disk already"
        )));
    }
    let started = Instant::now();
    let asked = SystemTime::now();
    if !send_signal(pid, UPGRADE_SIGNAL) {
        bail!("could not signal its main process (pid {pid})");
    }
    // The new image writes its state once it has started.
    let restarted = || {
        std::fs::metadata(ServiceState::path())
            .and_then(|m| m.modified())
            .is_ok_and(|t| t >= asked)
    };
    while started.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(100));
        if !pid_alive(pid) {
            bail!("its main process (pid {pid}) exited while upgrading (systemd restarts it)");
        }
        if !runs_replaced_binary(pid) && restarted() {
            return Ok(Some(format!(
                "service (pid {pid}): runs the binary on disk ({:.1} s)",
                started.elapsed().as_secs_f64()
            )));
        }
    }
    bail!(
        "its main process (pid {pid}) did not restart within {} s",
        WAIT.as_secs()
    )
}

/// Asks the device's supervisor to re-execute and waits until a server of
/// the new binary serves the device; the line to print.
fn upgrade_one(run_dir: &Path, record: &DeviceRecord, force: bool) -> Result<String> {
    let id = record.id;
    let live = device_info(id).is_ok_and(|i| i.state == DeviceState::Live);
    if !live || !pid_alive(record.pid) {
        bail!("it is not being served now (`vramblk recover {id}` first)");
    }
    let Some(supervisor) = record.holder_pid.filter(|&p| pid_alive(p)) else {
        bail!("it has no supervisor to hand it over (the service adopts such a device)");
    };
    if !handles_upgrade(supervisor) {
        bail!(
            "its supervisor (pid {supervisor}) runs a vramblk without upgrades; it keeps serving \
             with that binary (swap it off and add it again to move it to this one)"
        );
    }
    if !force && !runs_replaced_binary(supervisor) && !runs_replaced_binary(record.pid) {
        return Ok(format!(
            "{}: its server {} runs the binary on disk already",
            bdev_path(id),
            record.pid
        ));
    }
    let started = Instant::now();
    if !send_signal(supervisor, UPGRADE_SIGNAL) {
        bail!("could not signal its supervisor (pid {supervisor})");
    }
    while started.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(100));
        let Some(now) = DeviceRecord::load(run_dir, id) else {
            bail!(
                "it was removed while upgrading (see the log {})",
                record.log.display()
            );
        };
        // The record first: the device's control files are asked only once
        // the new server has written it (libublk complains on stderr while
        // a take-over rewrites its own).
        let served_by_new = now.pid != record.pid
            && pid_alive(now.pid)
            && !runs_replaced_binary(now.pid)
            && device_info(id).is_ok_and(|i| i.state == DeviceState::Live);
        if served_by_new {
            return Ok(format!(
                "{}: served by the binary on disk (server {} -> {}, supervisor {supervisor}) in \
                 {:.1} s",
                bdev_path(id),
                record.pid,
                now.pid,
                started.elapsed().as_secs_f64()
            ));
        }
        if !pid_alive(supervisor) {
            bail!(
                "its supervisor (pid {supervisor}) exited while upgrading; see the log {}",
                record.log.display()
            );
        }
        // A supervisor that could not execute the new binary keeps running
        // the old one (and logs why): no need to wait the whole time.
        if started.elapsed() > EXEC_WITHIN && runs_replaced_binary(supervisor) {
            bail!(
                "its supervisor (pid {supervisor}) did not execute the new binary within {} s; \
                 the device keeps its server; see the log {}",
                EXEC_WITHIN.as_secs(),
                record.log.display()
            );
        }
    }
    bail!(
        "no server of the new binary serves it {} s later; see the log {}",
        WAIT.as_secs(),
        record.log.display()
    )
}
