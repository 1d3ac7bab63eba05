//! Finding, inspecting and deleting ublk devices from outside their daemon.

use libublk::ctrl::UblkCtrl;
use libublk::sys;
use std::path::Path;
use thiserror::Error;

pub const CONTROL_NODE: &str = "/dev/ublk-control";

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("ublk_drv is not loaded ({CONTROL_NODE} is missing): run `modprobe ublk_drv`")]
    NoDriver,
    #[error("there is no ublk device {0}")]
    NoDevice(u32),
    #[error("deleting ublk device {id}: {source}")]
    Delete { id: u32, source: libublk::UblkError },
}

/// The kernel's view of a device's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceState {
    Live,
    Dead,
    Quiesced,
    FailIo,
    Unknown(u16),
}

impl std::fmt::Display for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceState::Live => f.write_str("live"),
            DeviceState::Dead => f.write_str("dead"),
            DeviceState::Quiesced => f.write_str("quiesced"),
            DeviceState::FailIo => f.write_str("fail-io"),
            DeviceState::Unknown(n) => write!(f, "state-{n}"),
        }
    }
}

/// What `list` needs to know about one device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub id: u32,
    pub state: DeviceState,
    pub queues: u16,
    pub depth: u16,
    pub daemon_pid: i32,
}

pub fn require_driver() -> Result<(), ControlError> {
    if Path::new(CONTROL_NODE).exists() {
        Ok(())
    } else {
        Err(ControlError::NoDriver)
    }
}

/// Ids of every ublk device the kernel knows, sorted.
pub fn device_ids() -> Vec<u32> {
    let mut ids = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/class/ublk-char") {
        for e in entries.flatten() {
            let name = e.file_name();
            if let Some(id) = name.to_str().and_then(|n| n.strip_prefix("ublkc")) {
                if let Ok(id) = id.parse() {
                    ids.push(id);
                }
            }
        }
    }
    ids.sort_unstable();
    ids
}

fn open(id: u32) -> Result<UblkCtrl, ControlError> {
    require_driver()?;
    if !device_ids().contains(&id) {
        return Err(ControlError::NoDevice(id));
    }
    let id32 = i32::try_from(id).map_err(|_| ControlError::NoDevice(id))?;
    UblkCtrl::new_simple(id32).map_err(|_| ControlError::NoDevice(id))
}

pub fn device_info(id: u32) -> Result<DeviceInfo, ControlError> {
    let ctrl = open(id)?;
    let info = ctrl.dev_info();
    let state = match info.state as u32 {
        sys::UBLK_S_DEV_LIVE => DeviceState::Live,
        sys::UBLK_S_DEV_DEAD => DeviceState::Dead,
        sys::UBLK_S_DEV_QUIESCED => DeviceState::Quiesced,
        sys::UBLK_S_DEV_FAIL_IO => DeviceState::FailIo,
        n => DeviceState::Unknown(n as u16),
    };
    Ok(DeviceInfo {
        id,
        state,
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
        daemon_pid: info.ublksrv_pid,
    })
}

/// Stops and removes device `id`; its daemon sees its queues abort and
/// exits. Returns once the kernel has released the device.
pub fn delete_device(id: u32) -> Result<(), ControlError> {
    let ctrl = open(id)?;
    ctrl.del_dev().map_err(|source| match source {
        libublk::UblkError::OtherError(e) if e == -libc::ENODEV || e == -libc::ENOENT => {
            ControlError::NoDevice(id)
        }
        source => ControlError::Delete { id, source },
    })?;
    Ok(())
}

/// The block node of device `id`.
pub fn bdev_path(id: u32) -> String {
    format!("/dev/ublkb{id}")
}

/// The char node of device `id`.
pub fn cdev_path(id: u32) -> String {
    format!("/dev/ublkc{id}")
}
