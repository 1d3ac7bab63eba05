//! `vramblk status [--json | --prometheus] [--output FILE]`: one status,
//! collected once (status.rs), printed as text, JSON or Prometheus metrics
//! (prometheus.rs), to standard output or into a file.

use crate::{prometheus, status};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// How `vramblk status` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    Prometheus,
}

pub fn run(format: Format, output: Option<&Path>) -> Result<()> {
    // Before anything is collected: a wrong command line is said as such,
    // not as a missing driver.
    if format == Format::Text && output.is_some() {
        bail!("--output writes --json or --prometheus; say which");
    }
    let s = status::collect()?;
    let machine = match format {
        Format::Text => None,
        Format::Json => Some(serde_json::to_string_pretty(&s)? + "\n"),
        Format::Prometheus => Some(prometheus::render(&s)),
    };
    match (machine, output) {
        (Some(text), Some(path)) => write_replacing(path, &text),
        (Some(text), None) => {
            print!("{text}");
            Ok(())
        }
        (None, _) => {
            status::print_text(&s);
            Ok(())
        }
    }
}

/// Writes `path` through a temporary file in the same directory and a
/// rename, so a reader (node_exporter) sees the old text or the new one,
/// never half of it.
fn write_replacing(path: &Path, text: &str) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("renaming {} to {}", tmp.display(), path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_without_a_machine_format_is_refused_first() {
        let e = run(Format::Text, Some(Path::new("/tmp/x"))).unwrap_err();
        assert!(
            e.to_string()
                .contains("--output writes --json or --prometheus"),
            "{e}"
        );
    }

    #[test]
    fn output_replaces_the_file_whole_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("vramblk-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("vramblk.prom");
        write_replacing(&file, "a 1\n").unwrap();
        write_replacing(&file, "b 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "b 2\n");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("vramblk.prom")]);
        assert!(write_replacing(&dir.join("no-such-dir/x.prom"), "c").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
