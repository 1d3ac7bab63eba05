//! vramblk.toml(5) (docs/man/vramblk.toml.5) and the default file
//! (systemd/vramblk.toml) name every key the parser takes, and no key it
//! refuses: the parser's own "expected one of" list is the truth.

use std::path::Path;
use vramblk_config::Config;

const MAN: &str = include_str!("../../../docs/man/vramblk.toml.5");
const DEFAULT_FILE: &str = include_str!("../../../systemd/vramblk.toml");

/// The keys the parser accepts in `table` (e.g. "[[device]]\nsize = \"1G\"\n"),
/// read from its refusal of an unknown one.
fn accepted_keys(table: &str) -> Vec<String> {
    let text = format!("{table}vramblk_no_such_key = 1\n");
    let err = Config::parse(&text, Path::new("t.toml")).unwrap_err();
    let msg = err.to_string();
    let list = msg
        .split_once("expected one of ")
        .unwrap_or_else(|| panic!("no key list in: {msg}"))
        .1;
    list.split(", ")
        .map(|k| k.trim().trim_matches('`').to_string())
        .collect()
}

/// The keys the man page documents in the section headed `.SH "name"`:
/// every `.BI key " = ..."` line up to the next section.
fn man_keys(section: &str) -> Vec<String> {
    let head = format!(".SH \"{section}\"");
    let start = MAN.find(&head).unwrap_or_else(|| panic!("no {head}"));
    let body = &MAN[start + head.len()..];
    let body = &body[..body.find("\n.SH ").unwrap_or(body.len())];
    body.lines()
        .filter_map(|l| l.strip_prefix(".BI "))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

#[test]
fn the_man_page_documents_exactly_the_keys_the_parser_takes() {
    for (section, table) in [
        ("[[device]]", "[[device]]\nsize = \"1G\"\n"),
        ("[power]", "[power]\n"),
        ("[pressure]", "[pressure]\n"),
    ] {
        let mut want = accepted_keys(table);
        let mut got = man_keys(section);
        want.sort();
        got.sort();
        assert_eq!(got, want, "vramblk.toml(5) section {section}");
    }
}

#[test]
fn the_default_file_names_every_device_key_and_parses() {
    for key in accepted_keys("[[device]]\nsize = \"1G\"\n") {
        assert!(
            DEFAULT_FILE.contains(&format!("# {key} = ")),
            "systemd/vramblk.toml does not show `{key}`"
        );
    }
    Config::parse(DEFAULT_FILE, Path::new("vramblk.toml")).unwrap();
}
