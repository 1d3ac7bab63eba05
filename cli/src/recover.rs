//! `vramblk recover ID`: ask a device's supervisor to restart its server now.

use crate::args::RecoverArgs;
use crate::del::vramblk_record;
use crate::service::ServiceState;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::{Duration, Instant};
use vramblk_config::{DeviceRecord, RUN_DIR};
use vramblk_daemon::host::{pid_alive, require_driver, require_root};
use vramblk_ublk_target::control::{bdev_path, device_info};
use vramblk_ublk_target::DeviceState;

/// How long `recover` waits to see the device live again.
const WAIT: Duration = Duration::from_secs(60);

pub fn run(a: &RecoverArgs) -> Result<()> {
    require_root("recover")?;
    require_driver()?;
    let id = a.id;
    let path = bdev_path(id);
    let record = vramblk_record(Path::new(RUN_DIR), id)?;
    let server_alive = pid_alive(record.pid);
    let info = device_info(id)?;
    if info.state == DeviceState::Live && server_alive {
        println!(
            "{path} is live (server pid {}); nothing to recover",
            record.pid
        );
        return Ok(());
    }
    match record.holder_pid.filter(|&p| pid_alive(p)) {
        Some(holder) => {
            let pid = i32::try_from(holder)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
                .with_context(|| format!("the record's supervisor pid {holder} is not a pid"))?;
            rustix::process::kill_process(pid, rustix::process::Signal::USR1)
                .with_context(|| format!("signalling the supervisor (pid {holder})"))?;
            println!("asked the supervisor (pid {holder}) to restart the server of {path}");
        }
        None => {
            match ServiceState::load().filter(|s| pid_alive(s.pid) && s.holding.contains(&id)) {
                Some(svc) => println!(
                    "{path} has no supervisor; the service (pid {}) holds its memory and adopts it",
                    svc.pid
                ),
                None => bail!(
                    "the memory behind {path} is gone (no supervisor or service holds it), so its \
                 data cannot be recovered; `vramblk del {id}` fails its waiting I/O and removes it"
                ),
            }
        }
    }
    let until = Instant::now() + WAIT;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
        let Some(now) = DeviceRecord::load(Path::new(RUN_DIR), id) else {
            bail!(
                "{path} was removed while recovering (see the log {})",
                record.log.display()
            );
        };
        let live = device_info(id)
            .map(|i| i.state == DeviceState::Live)
            .unwrap_or(false);
        if live && now.pid != record.pid && pid_alive(now.pid) {
            println!("{path} recovered (server pid {})", now.pid);
            return Ok(());
        }
    }
    bail!(
        "{path} is not live {} s later; see the log {}",
        WAIT.as_secs(),
        record.log.display()
    )
}
