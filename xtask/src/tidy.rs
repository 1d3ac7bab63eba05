//! Tidy tests (as rust-analyzer keeps): the repository stays true to
//! itself. Nothing in it points outside it, every file the docs name
//! exists, and every intra-doc link resolves. They run with the unit
//! tests (`cargo test --workspace`, so in `cargo xtask test`).

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("xtask sits in the workspace")
            .to_path_buf()
    }

    /// The repository's own text files: sources, scripts, docs, units.
    fn text_files(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name == "target" {
                continue;
            }
            if path.is_dir() {
                text_files(&path, out);
            } else if [
                "rs", "md", "sh", "c", "toml", "service", "conf", "target", "rules",
            ]
            .iter()
            .any(|ext| name.ends_with(&format!(".{ext}")))
            {
                out.push(path);
            }
        }
    }

    #[test]
    fn nothing_points_outside_the_repository() {
        let root = root();
        let mut files = Vec::new();
        text_files(&root, &mut files);
        // Built from pieces, so this file does not name them itself.
        let outside = [concat!("..", "/shared"), concat!("/wo", "rk/")];
        let mut found = Vec::new();
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            for (n, line) in text.lines().enumerate() {
                if outside.iter().any(|o| line.contains(o)) {
                    found.push(format!("{}:{}: {line}", f.display(), n + 1));
                }
            }
        }
        assert!(
            found.is_empty(),
            "paths outside the repository:\n{}",
            found.join("\n")
        );
    }

    /// Words in `text` that look like a path inside the repository
    /// (`dir/.../file.ext` with a known extension), without punctuation
    /// around them.
    fn named_paths(text: &str) -> Vec<String> {
        let exts = [".rs", ".sh", ".c", ".md", ".toml", ".service"];
        text.split(|c: char| c.is_whitespace() || "`()[],;:'\"*".contains(c))
            .map(|w| w.trim_end_matches('.'))
            .filter(|w| {
                w.contains('/')
                    && !w.starts_with('/')
                    && !w.starts_with("http")
                    && !w.contains("..")
                    && exts.iter().any(|e| w.ends_with(e))
            })
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn every_file_the_docs_name_exists() {
        let root = root();
        let mut missing = Vec::new();
        let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
            .expect("docs/")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "md"))
            .collect();
        docs.push(root.join("README.md"));
        for doc in &docs {
            let text = std::fs::read_to_string(doc).expect("a doc");
            for p in named_paths(&text) {
                // Only paths under one of the repository's own top-level
                // folders: the docs also cite the kernel's (mm/swapfile.c).
                let top = p.split('/').next().unwrap_or_default();
                if root.join(top).is_dir() && !root.join(&p).exists() {
                    missing.push(format!("{}: {p}", doc.display()));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "named in the docs, not in the repository:\n{}",
            missing.join("\n")
        );
    }

    #[test]
    fn path_words_are_found_in_prose() {
        assert_eq!(
            named_paths("see `cli/src/supervise.rs` (and ublk-target/src/queue.rs)."),
            vec!["cli/src/supervise.rs", "ublk-target/src/queue.rs"]
        );
        assert!(named_paths("/etc/vramblk.toml and https://x.org/a.rs").is_empty());
    }

    /// rustdoc with broken intra-doc links denied, in a target directory
    /// of its own (the unit tests' build holds the usual one).
    #[test]
    fn intra_doc_links_resolve() {
        let root = root();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = std::process::Command::new(cargo)
            .current_dir(&root)
            .args(["doc", "--no-deps", "--workspace", "--quiet"])
            .env("RUSTDOCFLAGS", "-D rustdoc::broken_intra_doc_links")
            .env("CARGO_TARGET_DIR", root.join("target/tidy-doc"))
            .output()
            .expect("running cargo doc");
        assert!(
            out.status.success(),
            "cargo doc found broken intra-doc links:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
