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
            Error::Io { .. } | Error::Command { .. } | Error::Internal(_) => Code::Internal,
        };
        if code == Code::Internal {
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

    #[test]
    fn codes_follow_the_csi_spec() {
        let cases = [
            (Error::invalid("x"), Code::InvalidArgument),
            (Error::VolumeNotFound("v".into()), Code::NotFound),
            (
                Error::NameConflict {
                    name: "n".into(),
                    reason: "r".into(),
                },
                Code::AlreadyExists,
            ),
            (Error::OutOfRange("x".into()), Code::OutOfRange),
            (Error::Exhausted("x".into()), Code::ResourceExhausted),
            (Error::Precondition("x".into()), Code::FailedPrecondition),
            (Error::BadToken("t".into()), Code::Aborted),
            (Error::Internal("x".into()), Code::Internal),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(err).code(), code);
        }
    }
}
