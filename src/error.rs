//! The crate's error types: one enum per failure domain, each naming what failed.
//!
//! Messages name the key or variable and the offending value, never a password, and do not
//! repeat their source: binaries print the whole chain with `{:#}`.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Why a configuration could not be loaded. Every variant is the operator's input to fix, so
/// binaries exit with code 2 on it.
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
    /// `origin` is `Section.Key` for a file value or the variable name for the environment.
    #[error("{origin}={value}: {reason}")]
    Invalid {
        origin: String,
        value: String,
        reason: String,
    },
}

/// A failure that stops the service after its configuration was accepted.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot open log file {path}")]
    LogFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot build the TLS connector for PostgreSQL")]
    Tls(#[source] native_tls::Error),
}
