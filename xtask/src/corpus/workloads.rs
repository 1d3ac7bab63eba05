//! The programs whose memory makes the corpus: each is started, builds up
//! its data, says `ready` on stdout and waits to be captured; the build's
//! compiler processes are captured while they run. A program this machine
//! lacks is skipped, and the corpus says so.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long a program may take to build its data.
const READY_WITHIN: Duration = Duration::from_secs(180);

/// A program that holds data in memory until killed.
pub struct Holder {
    pub name: &'static str,
    /// What it is, for the report.
    pub what: &'static str,
    program: &'static str,
    args: Vec<String>,
    /// Fed to its stdin (kept open afterwards, so it waits).
    stdin: Option<String>,
}

/// Python objects: dicts of words, numbers and nested lists, as a data
/// script holds them.
const PYTHON: &str = r#"
import json, random, sys
random.seed(7)
words = [''.join(random.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(random.randint(3, 10))) for _ in range(5000)]
rows = []
for i in range(150000):
    rows.append({'id': i, 'name': ' '.join(random.choice(words) for _ in range(3)),
                 'score': random.random() * 100, 'tags': [random.choice(words) for _ in range(4)],
                 'count': random.randint(0, 1000)})
text = json.dumps(rows[:20000])
index = {r['name']: r for r in rows}
print('ready', flush=True)
sys.stdin.read()
"#;

/// A JavaScript heap, as a browser tab's or an Electron app's: objects,
/// strings, typed arrays, a Map.
const NODE: &str = r#"
let seed = 7; const rnd = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;
const words = Array.from({length: 5000}, () => Math.floor(rnd() * 1e9).toString(36));
const nodes = [];
for (let i = 0; i < 150000; i++) {
  nodes.push({id: i, tag: words[i % 5000], text: words[(i * 7) % 5000] + ' ' + words[(i * 13) % 5000],
              x: rnd() * 1000, y: rnd() * 1000, children: [i + 1, i + 2], visible: i % 3 === 0});
}
const pixels = new Float32Array(2 * 1024 * 1024).map(() => rnd());
const cache = new Map(nodes.slice(0, 50000).map(n => [n.text, JSON.stringify(n)]));
console.log('ready');
process.stdin.resume();
"#;

/// A database's page cache: an in-memory SQLite database with rows of
/// text and numbers, and an index.
const SQLITE: &str = "PRAGMA cache_size = -200000;
CREATE TABLE orders(id INTEGER PRIMARY KEY, customer TEXT, item TEXT, qty INT, price REAL, note TEXT);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300000)
INSERT INTO orders SELECT i, 'customer-' || (i % 5000), 'item-' || (abs(random()) % 20000),
  abs(random()) % 10, (abs(random()) % 100000) / 100.0, hex(randomblob(8)) || ' shipped' FROM n;
CREATE INDEX by_customer ON orders(customer);
SELECT count(*), sum(qty) FROM orders;
.print ready
";

/// A shell holding variables: an associative array and a long string.
const SHELL: &str = r#"declare -A m; for i in $(seq 1 60000); do m[key$i]="value $i $RANDOM /usr/lib/x86_64-linux-gnu"; done; s=""; for i in $(seq 1 3000); do s+="line $i of the log: ok $RANDOM "; done; echo ready; read -r _"#;

pub fn holders() -> Vec<Holder> {
    vec![
        Holder {
            name: "python",
            what: "a Python process holding 150k dicts of words and numbers",
            program: "python3",
            args: vec!["-c".into(), PYTHON.into()],
            stdin: None,
        },
        Holder {
            name: "node",
            what: "a JavaScript heap (node): objects, strings, a Float32Array, a Map",
            program: "node",
            args: vec!["-e".into(), NODE.into()],
            stdin: None,
        },
        Holder {
            name: "sqlite",
            what: "SQLite (the sqlite3 shell): a 300k-row in-memory database with an index",
            program: "sqlite3",
            args: vec![":memory:".into()],
            stdin: Some(SQLITE.into()),
        },
        Holder {
            name: "shell",
            what: "bash holding a 60k-entry associative array and a long string",
            program: "bash",
            args: vec!["-c".into(), SHELL.into()],
            stdin: None,
        },
    ]
}

/// Whether `program` is on PATH.
pub fn available(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Holder {
    pub fn available(&self) -> bool {
        available(self.program)
    }

    /// Starts it and waits for `ready`; the child keeps its stdin open.
    pub fn start(&self) -> Result<Child> {
        let mut child = Command::new(self.program)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", self.program))?;
        if let (Some(text), Some(stdin)) = (&self.stdin, child.stdin.as_mut()) {
            stdin.write_all(text.as_bytes())?;
            stdin.flush()?;
        }
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if line.trim() == "ready" {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(READY_WITHIN).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} did not say ready within {} s",
                self.name,
                READY_WITHIN.as_secs()
            );
        }
        Ok(child)
    }
}

/// The compiler processes of a build: `cargo check` of this workspace into
/// a target dir of its own, with `sample` called on each rustc seen alive
/// every `every` until it returns false or the build ends.
pub fn during_build(
    root: &Path,
    target_dir: &Path,
    every: Duration,
    mut sample: impl FnMut(u32) -> bool,
) -> Result<()> {
    let mut build = Command::new(crate::cargo())
        .args(["check", "--workspace", "--quiet", "-j2", "--target-dir"])
        .arg(target_dir)
        .current_dir(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting cargo check")?;
    loop {
        std::thread::sleep(every);
        if build.try_wait()?.is_some() {
            return Ok(());
        }
        for pid in processes_named("rustc") {
            if !sample(pid) {
                let _ = build.kill();
                let _ = build.wait();
                return Ok(());
            }
        }
    }
}

/// The pids whose command name is `name`.
fn processes_named(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .collect()
}
