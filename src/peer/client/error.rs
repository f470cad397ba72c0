//! Why a pull failed, the gRPC code a caller answers with, and which failures a new attempt
//! may cure (the network) and which it cannot (a refusal, a wrong snapshot, a bad disk).

use std::error::Error as StdError;
use std::io;
use std::time::Duration;

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The peer gave a definite answer: not granted, no such snapshot, a bad request, or TLS
    /// refused one end's certificate.
    #[error("the peer refused the read ({code:?}): {message}")]
    Refused { code: Code, message: String },
    #[error(
        "the peer serves {advertised} bytes where {expected} were expected: a transfer of the \
         wrong size"
    )]
    WrongSize { expected: u64, advertised: u64 },
    #[error("the snapshot changed between attempts: it was {first}, it is now {now}")]
    SnapshotChanged { first: String, now: String },
    #[error("the peer broke the protocol: {0}")]
    Protocol(String),
    #[error(
        "the destination does not hold the snapshot: its SHA-256 is {actual}, the peer's is \
         {expected}"
    )]
    Mismatch { expected: String, actual: String },
    #[error(
        "gave up after {attempts} attempts in {elapsed:?}: {durable} of {size} bytes written and \
         synced; last error: {last}"
    )]
    GaveUp {
        attempts: u32,
        elapsed: Duration,
        /// How far the destination holds the snapshot durably.
        durable: u64,
        size: u64,
        last: String,
    },
    #[error("the destination failed at offset {offset}: {source}")]
    Destination {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot dial the peer: {0}")]
    Config(String),
}

impl PullError {
    /// The code a CSI call that needed this pull answers with.
    pub fn code(&self) -> Code {
        match self {
            PullError::Refused { code, .. } => *code,
            PullError::WrongSize { .. } => Code::FailedPrecondition,
            PullError::SnapshotChanged { .. } => Code::Aborted,
            PullError::Protocol(_) | PullError::Mismatch { .. } => Code::DataLoss,
            PullError::GaveUp { .. } => Code::Unavailable,
            PullError::Destination { .. } | PullError::Config(_) => Code::Internal,
        }
    }
}

/// How one attempt ended short of the end.
#[derive(Debug)]
pub(super) enum Failure {
    /// Trying again cannot help.
    Fatal(PullError),
    /// The network or the peer's process: resume from the durable offset.
    Transient(String),
}

impl From<PullError> for Failure {
    fn from(e: PullError) -> Self {
        Failure::Fatal(e)
    }
}

/// Codes only the peer's service answers with, after looking at the request.
fn definite(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::Unauthenticated
            | Code::DataLoss
    )
}

/// A TLS failure somewhere in an error's causes: a certificate refused by either end. rustls
/// errors reach us wrapped in `io::Error`s of kind `InvalidData`.
fn tls_refusal(err: &(dyn StdError + 'static)) -> Option<String> {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::InvalidData {
                return Some(io.to_string());
            }
        }
        cause = e.source();
    }
    None
}

pub(super) fn from_status(status: Status) -> Failure {
    if definite(status.code()) {
        return Failure::Fatal(PullError::Refused {
            code: status.code(),
            message: status.message().to_owned(),
        });
    }
    if let Some(why) = tls_refusal(&status) {
        return Failure::Fatal(PullError::Refused {
            code: Code::Unauthenticated,
            message: format!("TLS: {why}"),
        });
    }
    Failure::Transient(describe(&status))
}

pub(super) fn from_transport(err: tonic::transport::Error) -> Failure {
    match tls_refusal(&err) {
        Some(why) => Failure::Fatal(PullError::Refused {
            code: Code::Unauthenticated,
            message: format!("TLS: {why}"),
        }),
        None => Failure::Transient(describe(&err)),
    }
}

/// An error and its causes on one line.
fn describe(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_final_and_network_trouble_is_not() {
        for code in [
            Code::NotFound,
            Code::PermissionDenied,
            Code::InvalidArgument,
        ] {
            match from_status(Status::new(code, "no")) {
                Failure::Fatal(e) => assert_eq!(e.code(), code),
                other => panic!("{code:?}: {other:?}"),
            }
        }
        for code in [
            Code::Unavailable,
            Code::Unknown,
            Code::Internal,
            Code::Cancelled,
        ] {
            assert!(matches!(
                from_status(Status::new(code, "reset")),
                Failure::Transient(_)
            ));
        }
        let tls = Status::from_error(Box::new(io::Error::new(
            io::ErrorKind::InvalidData,
            "invalid peer certificate: UnknownIssuer",
        )));
        match from_status(tls) {
            Failure::Fatal(e) => {
                assert_eq!(e.code(), Code::Unauthenticated);
                assert!(e.to_string().contains("UnknownIssuer"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        let reset = Status::from_error(Box::new(io::Error::from(io::ErrorKind::ConnectionReset)));
        assert!(matches!(from_status(reset), Failure::Transient(_)));
    }
}
