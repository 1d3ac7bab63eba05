//! Where the logs go: stderr in the foreground; a daemon points them at its
//! log file (process.rs).

/// Logs at `info` and above (RUST_LOG overrides) to `target`, with
/// millisecond stamps (the crash boot reads how long I/O waited from them).
pub fn init_logging(target: env_logger::Target) {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(target)
        .format_timestamp_millis()
        .try_init();
}
