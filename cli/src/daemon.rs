//! Leaving a daemon behind: fork, report back over a pipe, and make the
//! daemon safe to serve swap (locked in memory, never OOM-killed).

use anyhow::{anyhow, bail, Context, Result};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The daemon's end of the pipe; the first report wins, later ones are
/// dropped. Cloneable so both the "live" callback and the error path can
/// hold it.
#[derive(Clone)]
pub struct Reporter(Arc<Mutex<Option<File>>>);

impl Reporter {
    fn new(fd: Option<OwnedFd>) -> Self {
        Reporter(Arc::new(Mutex::new(fd.map(File::from))))
    }

    /// A reporter for the foreground: nobody listens.
    pub fn none() -> Self {
        Reporter::new(None)
    }

    fn send(&self, line: &str) {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut f) = guard.take() {
            let _ = f.write_all(line.as_bytes());
        }
    }

    pub fn live(&self, id: u32) {
        self.send(&format!("OK {id}\n"));
    }

    pub fn fail(&self, message: &str) {
        self.send(&format!("ERR {message}\n"));
    }
}

/// Forks. The child detaches, logs to `log`, runs `serve` and exits; the
/// parent waits until the child reports the device live (returns its id) or
/// failed (returns the child's message).
pub fn spawn(log: &Path, serve: impl FnOnce(Reporter) -> Result<()>) -> Result<u32> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("creating a pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let log_file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening the daemon log {}", log.display()))?;

    // SAFETY: the process is single-threaded here (nothing has spawned a
    // thread yet), so the child may run arbitrary code after fork.
    match unsafe { libc::fork() } {
        -1 => bail!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            drop(rd);
            detach(&log_file);
            crate::init_logging(env_logger::Target::Pipe(Box::new(log_file)));
            let reporter = Reporter::new(Some(wr));
            let code = match serve(reporter.clone()) {
                Ok(()) => 0,
                Err(e) => {
                    log::error!("{e:#}");
                    reporter.fail(&format!("{e:#}"));
                    1
                }
            };
            std::process::exit(code);
        }
        _child => {
            drop(wr);
            drop(log_file);
            if !readable_within(&rd, REPORT_TIMEOUT_MS) {
                bail!(
                    "the daemon did not report within {} s; it is left running, see {}",
                    REPORT_TIMEOUT_MS / 1000,
                    log.display()
                );
            }
            let mut text = String::new();
            File::from(rd)
                .read_to_string(&mut text)
                .context("reading the daemon's report")?;
            parse_report(&text, log)
        }
    }
}

/// How long `add` waits for the daemon to bring the device up: allocating
/// and locking many GiB takes seconds, never minutes.
const REPORT_TIMEOUT_MS: i32 = 120_000;

fn readable_within(fd: &OwnedFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: p is one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if n >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return n > 0;
        }
    }
}

fn parse_report(text: &str, log: &Path) -> Result<u32> {
    let line = text.lines().next().unwrap_or("");
    if let Some(id) = line.strip_prefix("OK ") {
        return id
            .trim()
            .parse()
            .map_err(|_| anyhow!("daemon sent a bad device id {id:?}"));
    }
    if let Some(msg) = line.strip_prefix("ERR ") {
        bail!("{msg}");
    }
    bail!(
        "the daemon exited before the device came up; see {}",
        log.display()
    )
}

/// New session, stdin/stdout on /dev/null, stderr into the log.
fn detach(log: &File) {
    // SAFETY: plain syscalls on fds we own; failures leave the old fds,
    // which is harmless.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::close(null);
        }
        libc::dup2(log.as_raw_fd(), 2);
    }
    let _ = std::env::set_current_dir("/");
}

/// Keeps everything the server touches resident and the server alive
/// under memory pressure: a swap device whose server waits on reclaim
/// deadlocks the machine.
pub fn harden_for_swap() -> Result<()> {
    // SAFETY: mlockall has no memory-safety preconditions.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        bail!(
            "mlockall: {} (vramblk needs CAP_IPC_LOCK to serve swap)",
            std::io::Error::last_os_error()
        );
    }
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
        log::warn!("could not set oom_score_adj to -1000: {e}");
    }
    Ok(())
}

/// Where a daemon with this pid logs.
pub fn log_path(dir: &Path) -> PathBuf {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    dir.join(format!("vramblk-{pid}.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_parsed() {
        let log = Path::new("/run/vramblk/x.log");
        assert_eq!(parse_report("OK 7\n", log).unwrap(), 7);
        let e = parse_report("ERR no memory\n", log)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "no memory");
        let e = parse_report("", log).unwrap_err().to_string();
        assert!(e.contains("exited before the device came up; see /run/vramblk/x.log"));
    }
}
