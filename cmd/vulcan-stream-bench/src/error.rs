//! The generator's errors: bad arguments (exit 2) and everything that stops a run (exit 1).

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// An argument is out of range or inconsistent with another.
    #[error("{0}")]
    Usage(String),
    #[error("cannot connect to the stream at {url}: {cause}")]
    Server { url: String, cause: String },
    #[error("cannot connect to PostgreSQL at {target}: {cause}")]
    Database { target: String, cause: String },
    #[error("publishing on PostgreSQL at {target} failed: {cause}")]
    Publish { target: String, cause: String },
    #[error("{0}")]
    Run(String),
}

impl BenchError {
    /// The process exit code: 2 for bad arguments, 1 for a run that could not be done.
    pub fn exit_code(&self) -> u8 {
        match self {
            BenchError::Usage(_) => 2,
            _ => 1,
        }
    }
}
