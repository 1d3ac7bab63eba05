//! A cuda server's control socket (/run/vramblk/ublkbN.ctl): say how much
//! VRAM the device holds and uses, give the unused part back while the
//! device stays up, take it back. One line in, one JSON line out.
//!
//! The same thread takes VRAM back by itself when writes are about to run
//! out of room (after a give-back), as long as the GPU keeps the floor the
//! last give-back named free: the kernel may swap out more at any time, and
//! a write with no room fails.

use crate::memory::hand_over;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vramblk_config::{format_size, DeviceRecord};
use vramblk_cuda_store::{CudaStore, Resized};
use vramblk_store::Store;

/// Take VRAM back by itself when room for new data falls under this.
const LOW_ROOM: u64 = 64 << 20;

/// How often the room is looked at.
const ROOM_POLL: Duration = Duration::from_millis(100);

/// How long after a take-back that got nothing the next unasked try waits.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Longest a give-back may take (moves wait up to 2 s per busy extent).
const REPLY_WAIT: Duration = Duration::from_secs(60);

pub fn socket_path(run_dir: &Path, id: u32) -> PathBuf {
    run_dir.join(format!("ublkb{id}.ctl"))
}

/// What one line asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Usage,
    /// Hold at most `to` bytes (or what the data needs); take back later
    /// only while `floor` bytes stay free on the GPU.
    GiveBack {
        to: u64,
        floor: u64,
    },
    /// Hold up to `to` bytes again, keeping `floor` free on the GPU.
    TakeBack {
        to: u64,
        floor: u64,
    },
    /// Test hook: flip a bit of the data at device byte `offset` in VRAM
    /// (its checksum left as it was). Served only by a server started
    /// with VRAMBLK_TEST_HOOKS=1.
    FlipBit {
        offset: u64,
    },
}

/// The environment variable that lets a server take test hooks.
pub const TEST_HOOKS_ENV: &str = vramblk_ublk_target::test_hooks::HOOKS_ENV;

impl Command {
    fn line(&self) -> String {
        match self {
            Command::Usage => "usage".into(),
            Command::GiveBack { to, floor } => format!("give-back {to} {floor}"),
            Command::TakeBack { to, floor } => format!("take-back {to} {floor}"),
            Command::FlipBit { offset } => format!("flip-bit {offset}"),
        }
    }

    fn parse(line: &str) -> Result<Command, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> Result<u64, String> {
            words
                .get(i)
                .and_then(|w| w.parse().ok())
                .ok_or_else(|| format!("{line:?}: expected a byte count as word {}", i + 1))
        };
        match words.first() {
            Some(&"usage") if words.len() == 1 => Ok(Command::Usage),
            Some(&"give-back") if words.len() == 3 => Ok(Command::GiveBack {
                to: num(1)?,
                floor: num(2)?,
            }),
            Some(&"take-back") if words.len() == 3 => Ok(Command::TakeBack {
                to: num(1)?,
                floor: num(2)?,
            }),
            Some(&"flip-bit") if words.len() == 2 => Ok(Command::FlipBit { offset: num(1)? }),
            _ => Err(format!("{line:?}: not a command")),
        }
    }
}

/// The answer: the VRAM held now, how much of it holds data, what the
/// whole device takes, what a give-back would free, and for a give-back
/// what it did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VramReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub held: u64,
    pub used: u64,
    pub full: u64,
    /// What a give-back to nothing would free now.
    #[serde(default)]
    pub unused: u64,
    #[serde(default)]
    pub moved: u32,
    /// A compressed device's blocks moved to pack its pool before that.
    #[serde(default)]
    pub blocks_moved: u64,
    /// Whether pages carry checksums, and reads this server failed on a
    /// mismatch since it started.
    #[serde(default)]
    pub integrity: bool,
    #[serde(default)]
    pub integrity_errors: u64,
    /// A compressed device's pages (None: pages kept whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compressed: Option<CompressedUse>,
}

/// What a compressed device holds, as zramctl shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompressedUse {
    /// "same" or "lz".
    pub mode: String,
    /// Bytes of data stored: every written page whole (zramctl's DATA).
    pub data: u64,
    /// Bytes that data takes compressed (COMPR; same-filled pages none).
    pub compr: u64,
    /// VRAM the data and the maps take (TOTAL): whole pool extents.
    pub total: u64,
    pub same_pages: u64,
    pub compressed_pages: u64,
    /// Pages that did not shrink, kept whole.
    pub incompressible_pages: u64,
}

impl CompressedUse {
    /// DATA / TOTAL: how many times more data than the VRAM it takes.
    pub fn ratio(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.data as f64 / self.total as f64
        }
    }
}

/// The compressed part of a usage reply for `store`.
pub fn compressed_use(store: &CudaStore) -> Option<CompressedUse> {
    let u = store.packed_usage()?;
    Some(CompressedUse {
        mode: format!("{:?}", store.compress()).to_lowercase(),
        data: u.data_bytes(),
        compr: u.compr_bytes(),
        total: store.used_bytes(),
        same_pages: u.same_pages,
        compressed_pages: u.compressed_pages,
        incompressible_pages: u.raw_pages,
    })
}

/// Serves the socket from a thread of its own until the process ends.
/// `servers_end` is where the VRAM is handed to the supervisor after
/// every change; `reserve` the device's VRAM reserve, the least free VRAM
/// taking back ever leaves (a command may name more).
pub fn serve(
    run_dir: &Path,
    id: u32,
    store: Arc<CudaStore>,
    servers_end: OwnedFd,
    reserve: u64,
) -> std::io::Result<()> {
    let path = socket_path(run_dir, id);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    listener.set_nonblocking(true)?;
    let mut ctl = Control {
        run_dir: run_dir.to_path_buf(),
        id,
        store,
        servers_end,
        reserve,
        floor: reserve,
        failed_at: None,
    };
    std::thread::Builder::new()
        .name("vram-control".into())
        .spawn(move || {
            if let Err(e) = ctl.store.make_current() {
                log::warn!("server: VRAM control off: {e}");
                return;
            }
            loop {
                let wanted = ctl.store.wait_room_wanted(ROOM_POLL);
                match listener.accept() {
                    Ok((conn, _)) => ctl.answer(conn),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        log::warn!("server: VRAM control socket: {e}");
                        std::thread::sleep(ROOM_POLL);
                    }
                }
                ctl.keep_room(wanted);
            }
        })?;
    Ok(())
}

struct Control {
    run_dir: PathBuf,
    id: u32,
    store: Arc<CudaStore>,
    servers_end: OwnedFd,
    reserve: u64,
    /// Free VRAM that taking back leaves on the GPU.
    floor: u64,
    /// When taking back by itself last got nothing.
    failed_at: Option<Instant>,
}

impl Control {
    fn answer(&mut self, conn: UnixStream) {
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
        let mut line = String::new();
        let mut reader = BufReader::new(&conn);
        let reply = match reader.read_line(&mut line) {
            Ok(_) => match Command::parse(line.trim()) {
                Ok(cmd) => self.run(cmd),
                Err(e) => self.reply(Err(e), None),
            },
            Err(e) => self.reply(Err(format!("reading the command: {e}")), None),
        };
        let mut conn = conn;
        if let Ok(mut text) = serde_json::to_vec(&reply) {
            text.push(b'\n');
            let _ = conn.write_all(&text);
        }
    }

    /// The reply to a command: what the store holds now, and what a
    /// give-back `resized` moved.
    fn reply(&self, result: Result<(), String>, resized: Option<&Resized>) -> VramReply {
        VramReply {
            ok: result.is_ok(),
            error: result.err(),
            held: self.store.held_bytes(),
            used: self.store.used_bytes(),
            full: self.store.full_bytes(),
            unused: self.store.unused_bytes(),
            moved: resized.map_or(0, |r| r.moved),
            blocks_moved: resized.map_or(0, |r| r.blocks_moved),
            integrity: self.store.integrity(),
            integrity_errors: self.store.integrity_errors(),
            compressed: compressed_use(&self.store),
        }
    }

    fn run(&mut self, cmd: Command) -> VramReply {
        match cmd {
            Command::Usage => self.reply(Ok(()), None),
            Command::GiveBack { to, floor } => {
                self.floor = floor.max(self.reserve);
                match self.store.give_back(to) {
                    Ok(r) => {
                        if r.after < r.before {
                            self.publish();
                        }
                        self.reply(Ok(()), Some(&r))
                    }
                    Err(e) => self.reply(Err(e.to_string()), None),
                }
            }
            Command::TakeBack { to, floor } => {
                self.floor = floor.max(self.reserve);
                let r = self.take_back(to);
                self.reply(r, None)
            }
            Command::FlipBit { offset } => {
                let r = if std::env::var_os(TEST_HOOKS_ENV).is_some_and(|v| v == "1") {
                    match self.store.flip_bit(offset) {
                        Ok(true) => {
                            log::warn!("server: test hook: flipped a bit at byte {offset} in VRAM");
                            Ok(())
                        }
                        Ok(false) => Err(format!("byte {offset} holds no data")),
                        Err(e) => Err(e.to_string()),
                    }
                } else {
                    Err(format!(
                        "test hooks are off (the server runs without {TEST_HOOKS_ENV}=1)"
                    ))
                };
                self.reply(r, None)
            }
        }
    }

    /// Takes VRAM back up to `to` bytes: the new chunks go to the
    /// supervisor before any data may land in them.
    fn take_back(&mut self, to: u64) -> Result<(), String> {
        let before = self.store.held_bytes();
        let held = self
            .store
            .take_back(to, self.floor)
            .map_err(|e| e.to_string())?;
        if held > before {
            if let Err(e) = hand_over(&self.store, self.servers_end.as_fd()) {
                // Unheld VRAM would not survive a crash: give it back.
                let _ = self.store.give_back(before);
                return Err(format!("handing the new VRAM to the supervisor: {e:#}"));
            }
            self.store.open_held();
            self.write_record();
            log::info!(
                "server: took back {} of VRAM ({} held)",
                format_size(held - before),
                format_size(held)
            );
        }
        Ok(())
    }

    /// Tells the supervisor (and through it the service) which chunks
    /// hold the data now, and writes them in the device record.
    fn publish(&self) {
        if let Err(e) = hand_over(&self.store, self.servers_end.as_fd()) {
            log::warn!("server: the supervisor still holds the VRAM given back: {e:#}");
        }
        self.write_record();
    }

    fn write_record(&self) {
        let Some(mut record) = DeviceRecord::load(&self.run_dir, self.id) else {
            return;
        };
        record.backing = self.store.backing_layout();
        if let Err(e) = record.store(&self.run_dir) {
            log::warn!("could not update the device record: {e}");
        }
    }

    /// After a give-back: takes one more chunk when writes wait for room
    /// (`wanted`) or are about to, and answers the waiting writes. After a
    /// try that got nothing, waits a second before trying again unasked,
    /// and meanwhile answers waiting writes with no.
    fn keep_room(&mut self, wanted: bool) {
        let room = self.store.room_bytes();
        let refused = self.store.room_refused();
        if !wanted && room >= LOW_ROOM && !refused {
            return;
        }
        let recent_failure = self.failed_at.is_some_and(|t| t.elapsed() < RETRY_AFTER);
        let held = self.store.held_bytes();
        let grew = if held >= self.store.full_bytes() || recent_failure {
            false
        } else {
            match self.take_back(held + 1) {
                Ok(()) => self.store.held_bytes() > held,
                Err(e) => {
                    log::warn!("server: could not take VRAM back for new data: {e}");
                    false
                }
            }
        };
        if !grew && !recent_failure {
            self.failed_at = Some(Instant::now());
        }
        if grew {
            self.failed_at = None;
        }
        if wanted || refused || grew {
            let room_now = self.store.room_bytes() > 0;
            if wanted && !room_now && !grew {
                log::warn!(
                    "server: writes found no VRAM left to take back; they fail (ENOSPC) and the \
                     kernel keeps their data"
                );
            }
            self.store.room_answer(grew || room_now);
        }
    }
}

/// Sends `cmd` to the server of device `id` and returns its answer.
pub fn request(run_dir: &Path, id: u32, cmd: Command) -> Result<VramReply> {
    let path = socket_path(run_dir, id);
    let mut s = UnixStream::connect(&path)
        .with_context(|| format!("{} (is the device's server running?)", path.display()))?;
    s.set_read_timeout(Some(REPLY_WAIT))?;
    s.write_all(format!("{}\n", cmd.line()).as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    if line.is_empty() {
        bail!("{}: no answer", path.display());
    }
    Ok(serde_json::from_str(line.trim())?)
}

/// `vramblk flip-bit ID OFFSET` (hidden): the test hook, through the
/// device's control socket.
pub fn flip_bit(id: u32, offset: u64) -> Result<()> {
    crate::host::require_root("flip-bit")?;
    let run_dir = Path::new(vramblk_config::RUN_DIR);
    let reply = request(run_dir, id, Command::FlipBit { offset })?;
    if let Some(e) = reply.error {
        bail!("ublkb{id}: {e}");
    }
    println!("ublkb{id}: flipped a bit at byte {offset}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_and_bad_lines_are_refused() {
        for cmd in [
            Command::Usage,
            Command::GiveBack {
                to: 0,
                floor: 1 << 30,
            },
            Command::TakeBack {
                to: 7 << 30,
                floor: 512 << 20,
            },
            Command::FlipBit { offset: 4096 },
        ] {
            assert_eq!(Command::parse(&cmd.line()), Ok(cmd));
        }
        for bad in [
            "",
            "give-back",
            "give-back 1",
            "give-back x 1",
            "usage 1",
            "drop 1 2",
            "flip-bit",
            "flip-bit x",
        ] {
            assert!(Command::parse(bad).is_err(), "{bad:?}");
        }
    }
}
