//! Generated sections of the docs: text between a begin and an end marker
//! is replaced, the rest of the file kept.

use anyhow::{Context, Result};
use std::path::Path;

/// Replaces what lies between `begin` and `end` in `path` (markers
/// included) with `section`, which must start with `begin` and end with
/// `end`; appends it when the markers are missing.
pub fn splice(path: &Path, begin: &str, end: &str, section: &str) -> Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n\n".into());
    let new = spliced(&old, begin, end, section);
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}

fn spliced(old: &str, begin: &str, end: &str, section: &str) -> String {
    match (old.find(begin), old.find(end)) {
        (Some(b), Some(e)) if e > b => {
            format!("{}{section}{}", &old[..b], &old[e + end.len()..])
        }
        _ => format!("{old}\n{section}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::spliced;

    #[test]
    fn replaces_between_markers_and_keeps_the_rest() {
        let old = "head\n<!-- b -->\nold\n<!-- e -->\ntail\n";
        assert_eq!(
            spliced(
                old,
                "<!-- b -->",
                "<!-- e -->",
                "<!-- b -->\nnew\n<!-- e -->"
            ),
            "head\n<!-- b -->\nnew\n<!-- e -->\ntail\n"
        );
        assert_eq!(
            spliced(
                "head\n",
                "<!-- b -->",
                "<!-- e -->",
                "<!-- b -->x<!-- e -->"
            ),
            "head\n\n<!-- b -->x<!-- e -->\n"
        );
    }
}
