//! The one place where domain errors become gRPC codes.

use tonic::{Code, Status};

use crate::error::Error;

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        // No wildcard: a new variant must choose its code here.
        let code = match &err {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::VolumeNotFound(_) | Error::NotFound(_) => Code::NotFound,
            Error::NameConflict { .. } | Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::Exhausted(_) => Code::ResourceExhausted,
            Error::Precondition(_) => Code::FailedPrecondition,
            Error::BadToken(_) | Error::Busy(_) => Code::Aborted,
            Error::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Io { .. } | Error::Command { .. } | Error::Internal(_) => Code::Internal,
        };
        if matches!(code, Code::Internal | Code::DeadlineExceeded) {
            tracing::error!(error = %err, "request failed");
        } else {
            tracing::debug!(error = %err, ?code, "request refused");
        }
        Status::new(code, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Which variant `err` is. No wildcard: a new variant must be added here, and then the
    /// coverage assertion below fails until it has a case.
    fn variant(err: &Error) -> usize {
        match err {
            Error::InvalidArgument(_) => 0,
            Error::VolumeNotFound(_) => 1,
            Error::NotFound(_) => 2,
            Error::NameConflict { .. } => 3,
            Error::AlreadyExists(_) => 4,
            Error::OutOfRange(_) => 5,
            Error::Exhausted(_) => 6,
            Error::Precondition(_) => 7,
            Error::BadToken(_) => 8,
            Error::Busy(_) => 9,
            Error::Io { .. } => 10,
            Error::Command { .. } => 11,
            Error::DeadlineExceeded { .. } => 12,
            Error::Internal(_) => 13,
            Error::Unavailable(_) => 14,
        }
    }
    const VARIANTS: usize = 15;

    /// The code the CSI spec names for each kind of failure, and the message kept intact.
    #[test]
    fn every_variant_gets_the_spec_code_and_keeps_its_message() {
        let cases = [
            (Error::invalid("bad name"), Code::InvalidArgument),
            (Error::VolumeNotFound("kv-x".into()), Code::NotFound),
            (
                Error::NotFound("snapshot ks-x not found".into()),
                Code::NotFound,
            ),
            (
                Error::NameConflict {
                    name: "pvc-a".into(),
                    reason: "other size".into(),
                },
                Code::AlreadyExists,
            ),
            (
                Error::AlreadyExists("target in use".into()),
                Code::AlreadyExists,
            ),
            (
                Error::OutOfRange("above the limit".into()),
                Code::OutOfRange,
            ),
            (
                Error::Exhausted("pool full".into()),
                Code::ResourceExhausted,
            ),
            (
                Error::Precondition("not staged".into()),
                Code::FailedPrecondition,
            ),
            (Error::BadToken("zz".into()), Code::Aborted),
            (Error::Busy("kv-x".into()), Code::Aborted),
            (
                Error::io("open", "/x", std::io::Error::other("disk gone")),
                Code::Internal,
            ),
            (
                Error::Command {
                    command: "mkfs.ext4".into(),
                    status: "exit status: 1".into(),
                    stderr: "bad superblock".into(),
                },
                Code::Internal,
            ),
            (
                Error::DeadlineExceeded {
                    command: "mkfs.ext4".into(),
                    after: Duration::from_secs(120),
                    stderr: "still zeroing".into(),
                },
                Code::DeadlineExceeded,
            ),
            (Error::Internal("bug".into()), Code::Internal),
            (
                Error::Unavailable("API server: connection refused".into()),
                Code::Unavailable,
            ),
        ];
        let mut covered = [false; VARIANTS];
        for (err, code) in cases {
            covered[variant(&err)] = true;
            let message = err.to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{message}");
            assert_eq!(status.message(), message);
        }
        let missing: Vec<usize> = (0..VARIANTS).filter(|i| !covered[*i]).collect();
        assert!(missing.is_empty(), "variants without a case: {missing:?}");
    }
}
