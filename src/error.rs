//! The crate's error types: one enum per failure domain, each naming what failed. The
//! configuration's own, [`ConfigError`], is defined in `config` and re-exported here.
//!
//! Messages name the key or variable and the offending value, never a password, and do not
//! repeat their source: binaries print the whole chain with `{:#}`.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

pub use crate::config::ConfigError;

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
    #[error("cannot start the LISTEN receiver's thread")]
    ReceiverThread(#[source] io::Error),
}
