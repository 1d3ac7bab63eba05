//! Guest-side helper for the VM suites: a stand-in for the parts of
//! systemd that `vramblk.service` relies on to survive crashes, since the
//! test guests boot no systemd. It is not systemd; it follows sd_notify(3)
//! and sd_listen_fds(3) for these:
//!
//! - runs the command with NOTIFY_SOCKET set, as a child subreaper (the
//!   way PID 1 adopts and reaps a dead service's children);
//! - keeps the fds sent with "FDSTORE=1" under their FDNAME (one copy of a
//!   file however often it is sent), drops them on "FDSTOREREMOVE=1";
//! - when the command dies or fails (Restart=on-failure), runs the stop
//!   command with SERVICE_RESULT set, as systemd's documentation says
//!   ExecStop= runs (systemd 252 skips it after a failure: the systemd
//!   boot of the suite sees that), then starts the command again after
//!   RESTART_MS with the stored fds as 3, 4, ... (LISTEN_FDS,
//!   LISTEN_FDNAMES, LISTEN_PID);
//! - on SIGTERM, passes it on and exits when the command does.
//!
//! After every change the stored names go to STATE, one per line.
//!
//! usage: fdstore STATE SOCKET STOP_CMD -- COMMAND [ARGS...]

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use vramblk_store::handoff::file_id;

const RESTART_MS: u64 = 1000;

static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}

struct Store {
    fds: Vec<(String, OwnedFd)>,
    state: String,
}

impl Store {
    fn message(&mut self, text: &str, fds: Vec<OwnedFd>) {
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k).map(str::to_string))
        };
        let name = field("FDNAME=").unwrap_or_else(|| "stored".into());
        if field("FDSTORE=").as_deref() == Some("1") {
            for fd in fds {
                let id = file_id(fd.as_fd());
                if id.is_none() || !self.fds.iter().any(|(_, f)| file_id(f.as_fd()) == id) {
                    self.fds.push((name.clone(), fd));
                }
            }
            println!("fdstore: stored {name}; {} fds held", self.fds.len());
        } else if field("FDSTOREREMOVE=").as_deref() == Some("1") {
            self.fds.retain(|(n, _)| *n != name);
            println!("fdstore: removed {name}; {} fds held", self.fds.len());
        } else {
            println!("fdstore: {}", text.replace('\n', " "));
        }
        self.write_state();
    }

    fn write_state(&self) {
        let names: String = self.fds.iter().map(|(n, _)| format!("{n}\n")).collect();
        let _ = std::fs::write(&self.state, names);
    }
}

fn start(cmd: &[String], socket: &str, store: &Store) -> std::io::Result<libc::pid_t> {
    let raw: Vec<i32> = store.fds.iter().map(|(_, f)| f.as_raw_fd()).collect();
    let names: Vec<&str> = store.fds.iter().map(|(n, _)| n.as_str()).collect();
    // LISTEN_PID must be the command's pid: a shell learns its own ($$)
    // and execs the command in place.
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$@\"")
        .arg("sh")
        .args(cmd)
        .env("NOTIFY_SOCKET", socket);
    if raw.is_empty() {
        c.env_remove("LISTEN_FDS");
    } else {
        c.env("LISTEN_FDS", raw.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
    }
    // SAFETY: only dup/dup2/fcntl between fork and exec (async-signal-safe);
    // first out of the way of 3..n, then into place without CLOEXEC.
    unsafe {
        c.pre_exec(move || {
            let high: Vec<i32> = raw
                .iter()
                .map(|&f| libc::fcntl(f, libc::F_DUPFD_CLOEXEC, 1000))
                .collect();
            for (i, &f) in high.iter().enumerate() {
                if f < 0 || libc::dup2(f, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(c.spawn()?.id() as libc::pid_t)
}

/// systemd's SERVICE_RESULT for a main process that ended with `status`.
fn service_result(status: libc::c_int) -> &'static str {
    if libc::WIFSIGNALED(status) {
        "signal"
    } else if libc::WEXITSTATUS(status) != 0 {
        "exit-code"
    } else {
        "success"
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let split = args.iter().position(|a| a == "--");
    let (Some(split), true) = (split, args.len() > 5) else {
        eprintln!("usage: fdstore STATE SOCKET STOP_CMD -- COMMAND [ARGS...]");
        return ExitCode::from(2);
    };
    let (state, socket, stop) = (&args[1], &args[2], &args[3]);
    let cmd = &args[split + 1..];
    // SAFETY: prctl and signal with constant arguments and a handler that
    // only stores to an atomic.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        libc::signal(
            libc::SIGTERM,
            on_term as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let _ = std::fs::remove_file(socket);
    let sock = match UnixDatagram::bind(socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fdstore: binding {socket}: {e}");
            return ExitCode::from(1);
        }
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
    let mut store = Store {
        fds: Vec::new(),
        state: state.clone(),
    };
    store.write_state();
    let mut main_pid = match start(cmd, socket, &store) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("fdstore: starting {cmd:?}: {e}");
            return ExitCode::from(1);
        }
    };
    let mut term_sent = false;
    loop {
        if TERM.load(Ordering::SeqCst) && !term_sent {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(main_pid, libc::SIGTERM) };
            term_sent = true;
        }
        if let Ok((text, fds)) = vramblk_store::handoff::recv(sock.as_fd()) {
            store.message(&text, fds);
        }
        loop {
            let mut status = 0;
            // SAFETY: waitpid with WNOHANG on our children (and orphans
            // re-parented to us as subreaper).
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if pid != main_pid {
                continue;
            }
            let result = service_result(status);
            println!("fdstore: main process {pid} ended: {result}");
            let _ = Command::new("sh")
                .arg("-c")
                .arg(stop)
                .env("SERVICE_RESULT", result)
                .status();
            if result == "success" || term_sent {
                println!("fdstore: stopped; {} fds were held", store.fds.len());
                store.fds.clear();
                store.write_state();
                return ExitCode::SUCCESS;
            }
            std::thread::sleep(Duration::from_millis(RESTART_MS));
            println!("fdstore: restarting with {} stored fds", store.fds.len());
            main_pid = match start(cmd, socket, &store) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("fdstore: restarting: {e}");
                    return ExitCode::from(1);
                }
            };
        }
    }
}
