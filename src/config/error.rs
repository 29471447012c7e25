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
    /// One of two settings that work only together is set without the other. `missing` names
    /// both places the other one can be set.
    #[error("{set} is set without {missing}: {reason}")]
    Unpaired {
        set: String,
        missing: String,
        reason: &'static str,
    },
    /// A setting that cannot take effect with another one's value (`other` names it, with its
    /// value).
    #[error("{origin} cannot be used with {other}: {reason}")]
    Conflict {
        origin: String,
        other: String,
        reason: &'static str,
    },
}
