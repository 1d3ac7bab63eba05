//! `vramblk resume-supervisor`, the hidden command a supervisor re-executes
//! itself as for an upgrade (upgrade.rs): the state it was handed, the
//! device's record, the memory from the inherited fds, and on with
//! supervise.rs.

use crate::plan::Plan;
use crate::upgrade::{memory_from, ResumeState};
use anyhow::{anyhow, Result};
use std::path::Path;
use vramblk_config::DeviceRecord;

/// `vramblk resume-supervisor`: the supervisor after re-executing itself.
/// Logs where it logged before, then supervises the device on.
pub fn resume_supervisor(run_dir: &Path, state_text: &str) -> Result<()> {
    let state: ResumeState = state_text.parse()?;
    let record = DeviceRecord::load(run_dir, state.id)
        .ok_or_else(|| anyhow!("no record of device {} in {}", state.id, run_dir.display()))?;
    let plan = Plan {
        reserve: state.reserve,
        ..Plan::from_record(&record)
    };
    init_log(&plan.log);
    crate::panics::abort_on_panic();
    let result = memory_from(&state)
        .and_then(|memory| crate::supervise::resume(&plan, run_dir, memory, &state));
    if let Err(e) = &result {
        log::error!("supervisor: {e:#}");
    }
    result
}

/// The same log file the previous image wrote (stderr already points
/// there for a daemon), as process::spawn sets it up.
fn init_log(log: &Path) {
    let file = (log != Path::new("-"))
        .then(|| std::fs::File::options().append(true).open(log).ok())
        .flatten();
    match file {
        Some(file) => crate::process::log_into(file),
        None => crate::init_logging(env_logger::Target::Stderr),
    }
}
