//! Why a configuration could not be loaded. It lives with the configuration, which then
//! depends on nothing else in the crate; `crate::error` re-exports it beside the run-time errors.

use std::io;
use std::path::PathBuf;

/// Every variant is the operator's input to fix, so binaries exit with code 2 on it.
///
/// Messages name the key or variable and the offending value, never a password, and do not
/// repeat their source: binaries print the whole chain with `{:#}`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    /// Names match case-insensitively, so two spellings of one name would silently pick one.
    #[error("config file {path}: {first} and {second} are the same name (names ignore case)")]
    SameName {
        path: PathBuf,
        first: String,
        second: String,
    },
    #[error("cannot read the configuration from the environment")]
    Environment(#[source] envy::Error),
    /// `origin` is `Section.Key` for a file value or the variable name for the environment.
    #[error("{origin}={value}: {reason}")]
    Invalid {
        origin: String,
        value: String,
        reason: String,
    },
}
