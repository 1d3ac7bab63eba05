//! For tests of what a process does as it dies (panics.rs, faults.rs):
//! the test runs itself again in a child process, which finds the
//! variable [`KERNEL_LOG`] set to a stand-in for /dev/kmsg and dies there.

use std::path::PathBuf;
use std::process::Output;

/// Set in the dying copy of a test binary: the stand-in kernel log's path.
pub const KERNEL_LOG: &str = "VRAMBLK_DYING_CHILD_KERNEL_LOG";

/// The stand-in kernel log, when this process is the dying copy.
pub fn kernel_log() -> Option<PathBuf> {
    std::env::var_os(KERNEL_LOG).map(PathBuf::from)
}

/// Runs test `name` (its full path) in a copy of this test binary; what
/// it printed and how it ended, and what it wrote to its kernel log.
/// Files the copy made beside the log (its path with another extension)
/// are removed.
pub fn run(name: &str) -> (Output, String) {
    let kernel_log = std::env::temp_dir().join(format!(
        "vramblk-dying-{}-{}",
        std::process::id(),
        name.rsplit("::").next().unwrap_or(name)
    ));
    std::fs::write(&kernel_log, "").expect("stand-in kernel log");
    let exe = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(KERNEL_LOG, &kernel_log)
        .output()
        .expect("run the dying copy");
    let said = std::fs::read_to_string(&kernel_log).expect("read the kernel log");
    let _ = std::fs::remove_file(&kernel_log);
    let _ = std::fs::remove_file(kernel_log.with_extension("log"));
    (out, said)
}

/// In the dying copy: runs `f` (which should end the process) on a thread
/// named `thread`; exits 0, which the test then reports, if the process
/// went on.
pub fn die_on_thread<T: Send + 'static>(thread: &str, f: impl FnOnce() -> T + Send + 'static) -> ! {
    let t = std::thread::Builder::new()
        .name(thread.into())
        .spawn(f)
        .expect("spawn");
    let _ = t.join();
    std::process::exit(0)
}
