//! The one domain error type. `csi::status` maps every variant to a gRPC code.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or asks for something Kennel never supports.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// No volume with this ID exists (includes IDs that cannot be valid).
    #[error("volume {0:?} not found")]
    VolumeNotFound(String),

    /// A path, snapshot or other object named by the request does not exist.
    #[error("{0}")]
    NotFound(String),

    /// A volume with this name exists and does not match the request.
    #[error("volume name {name:?} already exists with different properties: {reason}")]
    NameConflict { name: String, reason: String },

    /// The target is already used by something incompatible with the request.
    #[error("{0}")]
    AlreadyExists(String),

    /// The capacity range cannot be satisfied by any volume size.
    #[error("capacity out of range: {0}")]
    OutOfRange(String),

    /// The pool, the disk or the node has no room for the request.
    #[error("resource exhausted: {0}")]
    Exhausted(String),

    /// The volume is not in the state the call needs (e.g. publish before stage).
    #[error("failed precondition: {0}")]
    Precondition(String),

    /// A pagination token that Kennel did not hand out.
    #[error("invalid starting token {0:?}")]
    BadToken(String),

    /// Something the answer depends on cannot be reached now (the API server, another
    /// node); the caller may retry.
    #[error("unavailable: {0}")]
    Unavailable(String),

    /// An operation on this volume is already running.
    #[error("operation already in progress for {0}")]
    Busy(String),

    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },

    /// A host tool outlived its deadline and was killed.
    #[error("{command} did not finish within {after:?} and was killed; stderr: {stderr}")]
    DeadlineExceeded {
        command: String,
        after: std::time::Duration,
        stderr: String,
    },

    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}

/// Attach a path and a verb to an io::Error.
pub trait IoContext<T> {
    fn ctx(self, what: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(what, path, e))
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn ctx(self, what: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(what, path, std::io::Error::from(e)))
    }
}
