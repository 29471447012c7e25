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
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("cannot start the LISTEN receiver's thread")]
    ReceiverThread(#[source] io::Error),
}

/// The schema version this build reads and writes (durable mode).
pub const SCHEMA_VERSION: i32 = 2;

/// Why the schema could not be created, upgraded or read.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot connect to {target}: {cause}")]
    Connect { target: String, cause: String },
    #[error("migration to schema version {version} failed on {target}: {cause}")]
    Migrate {
        version: i32,
        target: String,
        cause: String,
    },
    #[error(
        "schema vulcan_stream on {target} is at version {found}, newer than this build's \
         {SCHEMA_VERSION}: upgrade vulcan-stream"
    )]
    Newer { target: String, found: i32 },
    #[error(
        "schema vulcan_stream is missing or incomplete on {target} ({cause}): run \
         `vulcan-stream migrate` with the same configuration"
    )]
    Missing { target: String, cause: String },
    #[error("schema vulcan_stream on {target}: {cause}")]
    Query { target: String, cause: String },
}
