//! Guest-side helper for the VM suites: parses a JSON file and prints the
//! value at a dotted path (`devices.0.swap.priority`); strings print bare,
//! anything else as JSON. Exit 1 when the file does not parse or the path
//! is missing, so `vramblk status --json` is really parsed, not grepped.
//!
//! usage: jsonq FILE PATH

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(file), Some(path)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: jsonq FILE PATH");
        return ExitCode::from(2);
    };
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("jsonq: {file}: {e}");
            return ExitCode::from(1);
        }
    };
    let mut v: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("jsonq: {file} is not JSON: {e}");
            return ExitCode::from(1);
        }
    };
    for key in path.split('.').filter(|k| !k.is_empty()) {
        // A number indexes an array; in an object it is a key ("0").
        let next = match (key.parse::<usize>(), v.is_array()) {
            (Ok(i), true) => v.get(i),
            _ => v.get(key),
        };
        match next {
            Some(n) => v = n.clone(),
            None => {
                eprintln!("jsonq: {file} has no {path} (stopped at {key})");
                return ExitCode::from(1);
            }
        }
    }
    match v {
        serde_json::Value::String(s) => println!("{s}"),
        other => println!("{other}"),
    }
    ExitCode::SUCCESS
}
