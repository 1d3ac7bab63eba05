//! The server's counters on a Unix socket (/run/vramblk/ublkbN.sock): each
//! connection gets one JSON line and is closed. `vramblk status` reads it.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use vramblk_ublk_target::{CounterSnapshot, DeviceCounters};

/// What a server answers: its pid, its queue count, and the counters
/// since it started (see [`CounterSnapshot`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsReply {
    pub pid: u32,
    pub queues: u16,
    #[serde(flatten)]
    pub counters: CounterSnapshot,
}

pub fn socket_path(run_dir: &Path, id: u32) -> PathBuf {
    run_dir.join(format!("ublkb{id}.sock"))
}

fn reply(counters: &DeviceCounters, queues: u16) -> StatsReply {
    StatsReply {
        pid: crate::host::own_pid(),
        queues,
        counters: counters.snapshot(),
    }
}

/// Answers on `path` from a thread of its own until the process ends.
pub fn serve(path: &Path, counters: Arc<DeviceCounters>, queues: u16) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("stats".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let mut conn = conn;
                let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
                if let Ok(mut line) = serde_json::to_vec(&reply(&counters, queues)) {
                    line.push(b'\n');
                    let _ = conn.write_all(&line);
                }
            }
        })?;
    Ok(())
}

/// The server's answer, or None when it does not answer within a second.
pub fn query(path: &Path) -> Option<StatsReply> {
    let mut s = UnixStream::connect(path).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    serde_json::from_str(text.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    #[test]
    fn a_query_reads_the_counters() {
        let dir = std::env::temp_dir().join(format!("vramblk-stats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = socket_path(&dir, 7);
        let counters = Arc::new(DeviceCounters::new(2));
        serve(&path, counters.clone(), 2).unwrap();
        let q = counters.queue(1).unwrap();
        q.writes.fetch_add(5, Relaxed);
        q.write_bytes.fetch_add(5 * 4096, Relaxed);
        q.record_latency(Duration::from_micros(40));
        let r = query(&path).unwrap();
        assert_eq!(
            (r.counters.writes, r.counters.write_bytes, r.queues),
            (5, 20480, 2)
        );
        assert_eq!(r.counters.p50_us, Some(40.0));
        assert!(query(&dir.join("none.sock")).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
