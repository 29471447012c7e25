//! Configuration: any TOML text and any environment give a configuration or an error, never a
//! panic, and neither shows a secret (the database password, the client key, the stream
//! token).
//!
//! Input: the TOML file's text, then optionally a NUL byte and the environment as
//! `NAME=value` lines. A line setting a secret's variable sets it to a known text whatever its
//! value, so that the text can be looked for in what the configuration shows.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vulcan_stream::Config;

/// The variables holding secrets; the value each is given; the texts that must not show (the
/// value, and what it decodes to where it is base64).
const SECRETS: &[(&str, &str, &[&str])] = &[
    ("PG_PASSWORD", "fuzz-secret-7f3a", &["fuzz-secret-7f3a"]),
    ("PG_PWD", "fuzz-secret-7f3a", &["fuzz-secret-7f3a"]),
    (
        "PG_SSLKEY_B64",
        "ZnV6ei1rZXktN2YzYQ==",
        &["ZnV6ei1rZXktN2YzYQ", "fuzz-key-7f3a"],
    ),
    ("STREAM_TOKEN", "fuzz-token-7f3a", &["fuzz-token-7f3a"]),
];

/// One file per fuzzing process, written for every input and removed after it: in memory
/// (/dev/shm) where there is one, as a disk's file system would write every version back and
/// slow the fuzzer tenfold.
fn config_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let shm = PathBuf::from("/dev/shm");
        let dir = if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        };
        dir.join(format!(
            "vulcan-stream-fuzz-config-{}.toml",
            std::process::id()
        ))
    })
}

fuzz_target!(|input: &str| {
    let (toml, env) = input.split_once('\0').unwrap_or((input, ""));
    let env: Vec<(&str, &str)> = env
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();
    let path = config_path();
    std::fs::write(path, toml).expect("write the config file");
    let lookup = |name: &str| -> Option<String> {
        let value = env.iter().rev().find(|(key, _)| *key == name)?.1;
        let secret = SECRETS.iter().find(|(secret, _, _)| *secret == name);
        Some(secret.map_or(value, |(_, given, _)| given).to_owned())
    };
    let loaded = Config::load(Some(path), &lookup);
    let _ = std::fs::remove_file(path);
    let shown = match loaded {
        Ok(loaded) => format!("{:?} {:?}", loaded.config, loaded.unknown_keys),
        Err(err) => format!("{err:#} {err:?}"),
    };
    for needle in SECRETS.iter().flat_map(|(_, _, needles)| needles.iter()) {
        // A secret's text may show only where the input itself put it elsewhere.
        if !input.contains(needle) {
            assert!(!shown.contains(needle), "{needle} shows: {shown}");
        }
    }
});
