//! What clap can write from the command-line definition itself: the shell
//! completion scripts (`vramblk completions SHELL`) and the man pages
//! (`vramblk manpages DIR`, run by `cargo xtask deb`), so neither can fall
//! out of step with `--help`.

use crate::args::Cli;
use anyhow::{Context, Result};
use clap::CommandFactory;
use std::path::Path;

/// `vramblk completions SHELL`: the script on standard output.
pub fn completions(shell: clap_complete::Shell) -> Result<()> {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "vramblk", &mut std::io::stdout());
    Ok(())
}

/// `vramblk manpages DIR`: vramblk.1 and one page per visible command
/// (vramblk-add.1, vramblk-config-check.1, ...); returns the file names.
pub fn manpages(dir: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    let mut written = Vec::new();
    write_pages(&cmd, "vramblk", dir, &mut written)?;
    Ok(written)
}

fn write_pages(
    cmd: &clap::Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<String>,
) -> Result<()> {
    // Subcommands get the full name ("vramblk-config-check"), as git's
    // pages do, so `man vramblk-add` finds one.
    let page = cmd
        .clone()
        .name(name.to_string())
        .version(env!("CARGO_PKG_VERSION"));
    let file = format!("{name}.1");
    let mut text = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut text)
        .with_context(|| format!("rendering {file}"))?;
    std::fs::write(dir.join(&file), text).with_context(|| format!("writing {file}"))?;
    written.push(file);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_for_every_visible_command_and_none_for_hidden_ones() {
        let dir = std::env::temp_dir().join(format!("vramblk-man-{}", std::process::id()));
        let files = manpages(&dir).unwrap();
        for want in [
            "vramblk.1",
            "vramblk-add.1",
            "vramblk-status.1",
            "vramblk-config-check.1",
        ] {
            assert!(
                files.iter().any(|f| f == want),
                "{want} missing from {files:?}"
            );
        }
        for hidden in ["vramblk-flip-bit.1", "vramblk-manpages.1", "vramblk-help.1"] {
            assert!(!files.iter().any(|f| f == hidden), "{hidden} written");
        }
        let add = std::fs::read_to_string(dir.join("vramblk-add.1")).unwrap();
        assert!(
            add.contains(".TH vramblk-add 1"),
            "{}",
            &add[..200.min(add.len())]
        );
        assert!(add.contains("\\-\\-size"), "the add page documents --size");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn completion_scripts_name_the_commands() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "vramblk", &mut out);
            let text = String::from_utf8(out).unwrap();
            for word in ["add", "status", "release", "size", "prometheus"] {
                assert!(text.contains(word), "{shell}: {word} missing");
            }
        }
    }
}
