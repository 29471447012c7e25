//! Configuration: any TOML text and any environment give a configuration or an error, never a
//! panic, and neither shows the database password.
//!
//! Input: the TOML file's text, then optionally a NUL byte and the environment as
//! `NAME=value` lines. A `PG_PASSWORD` line sets the password to a known text whatever its
//! value, so that it can be looked for in what the configuration shows.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vulcan_stream::Config;

/// The password, when the environment sets one.
const PASSWORD: &str = "fuzz-secret-7f3a";

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
        Some(
            if name == "PG_PASSWORD" {
                PASSWORD
            } else {
                value
            }
            .to_owned(),
        )
    };
    let loaded = Config::load(Some(path), &lookup);
    let _ = std::fs::remove_file(path);
    // The password's text may show only where the input itself put it elsewhere.
    if input.contains(PASSWORD) {
        return;
    }
    let shown = match loaded {
        Ok(loaded) => format!("{:?} {:?}", loaded.config, loaded.unknown_keys),
        Err(err) => format!("{err:#} {err:?}"),
    };
    assert!(!shown.contains(PASSWORD), "the password shows: {shown}");
});
