//! A command that prints, its reader gone (`vramblk ... | head -1` once head
//! has its line): it ends of SIGPIPE, quietly, as other Unix tools do, not
//! with a panic about a broken pipe.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

#[test]
fn a_printing_command_whose_reader_is_gone_ends_quietly() {
    let (reader, writer) = std::io::pipe().expect("pipe");
    // The reader is gone before the command writes its first byte.
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_vramblk"))
        .args(["completions", "bash"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run vramblk");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{stderr}");
    assert!(stderr.is_empty(), "nothing said on stderr: {stderr}");
}
