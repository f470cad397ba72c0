//! What the client accepts of a stream: one header naming the expected size, the same size and
//! hash on every attempt, then chunks in order, within the size, up to the end.

use super::error::PullError;
use crate::peer::digest::{hex, Sha256, BLOCK};
use crate::peer::pb::SnapshotHeader;

/// The snapshot as the peer described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Advertised {
    pub size: u64,
    pub sha256: Sha256,
}

impl std::fmt::Display for Advertised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes, SHA-256 {}", self.size, hex(&self.sha256))
    }
}

/// Check a stream's header against the expected size and what earlier attempts saw.
pub(super) fn check_header(
    header: &SnapshotHeader,
    expected_size: u64,
    first: Option<&Advertised>,
) -> Result<Advertised, PullError> {
    let sha256: Sha256 =
        header.sha256.as_slice().try_into().map_err(|_| {
            PullError::Protocol(format!("a SHA-256 of {} bytes", header.sha256.len()))
        })?;
    let now = Advertised {
        size: header.size_bytes,
        sha256,
    };
    if let Some(first) = first {
        if *first != now {
            return Err(PullError::SnapshotChanged {
                first: first.to_string(),
                now: now.to_string(),
            });
        }
    }
    if now.size != expected_size {
        return Err(PullError::WrongSize {
            expected: expected_size,
            advertised: now.size,
        });
    }
    Ok(now)
}

/// The chunks of one stream, from the offset it was asked for.
#[derive(Debug)]
pub(super) struct Chunks {
    next: u64,
    size: u64,
}

impl Chunks {
    pub fn new(from: u64, size: u64) -> Self {
        Chunks { next: from, size }
    }

    /// Where the next chunk must start: everything before it has been accepted.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Accept a chunk of `len` bytes at `offset`, or say how it breaks the order.
    pub fn accept(&mut self, offset: u64, len: usize) -> Result<(), PullError> {
        if offset != self.next {
            return Err(PullError::Protocol(format!(
                "a chunk at offset {offset} where {} was next",
                self.next
            )));
        }
        if len == 0 || len > BLOCK {
            return Err(PullError::Protocol(format!(
                "a chunk of {len} bytes at offset {offset} (1 to {BLOCK} allowed)"
            )));
        }
        let end = offset.saturating_add(len as u64);
        if end > self.size {
            return Err(PullError::Protocol(format!(
                "a chunk ending at {end}, past the snapshot's {} bytes",
                self.size
            )));
        }
        self.next = end;
        Ok(())
    }

    /// The stream has ended: it must have reached the snapshot's end.
    pub fn finish(&self) -> Result<(), PullError> {
        if self.next != self.size {
            return Err(PullError::Protocol(format!(
                "the stream ended at offset {} of {}",
                self.next, self.size
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(size: u64, byte: u8) -> SnapshotHeader {
        SnapshotHeader {
            size_bytes: size,
            sha256: vec![byte; 32],
        }
    }

    #[test]
    fn headers_must_match_the_expected_size_and_earlier_attempts() {
        let first = check_header(&header(8192, 1), 8192, None).unwrap();
        assert_eq!(first.size, 8192);
        assert_eq!(
            check_header(&header(8192, 1), 8192, Some(&first)).unwrap(),
            first
        );
        assert!(matches!(
            check_header(&header(4096, 1), 8192, None),
            Err(PullError::WrongSize {
                expected: 8192,
                advertised: 4096
            })
        ));
        let changed = check_header(&header(8192, 2), 8192, Some(&first)).unwrap_err();
        assert!(
            matches!(changed, PullError::SnapshotChanged { .. }),
            "{changed}"
        );
        let short = SnapshotHeader {
            size_bytes: 8192,
            sha256: vec![0; 31],
        };
        assert!(matches!(
            check_header(&short, 8192, None),
            Err(PullError::Protocol(_))
        ));
    }

    #[test]
    fn chunks_come_in_order_within_the_size_up_to_the_end() {
        let size = BLOCK as u64 + 100;
        let mut chunks = Chunks::new(0, size);
        assert!(chunks.finish().is_err());
        // Out of order, empty, oversized.
        assert!(chunks.accept(4096, 10).is_err());
        assert!(chunks.accept(0, 0).is_err());
        assert!(chunks.accept(0, BLOCK + 1).is_err());
        chunks.accept(0, BLOCK).unwrap();
        // A repeat of the same chunk is out of order too.
        assert!(chunks.accept(0, BLOCK).is_err());
        // Past the end.
        assert!(chunks.accept(BLOCK as u64, 101).is_err());
        let early = chunks.finish().unwrap_err();
        assert!(
            early.to_string().contains("ended at offset 1048576"),
            "{early}"
        );
        chunks.accept(BLOCK as u64, 100).unwrap();
        assert_eq!(chunks.next(), size);
        chunks.finish().unwrap();
        // A resumed stream starts where it was asked to.
        let mut resumed = Chunks::new(8192, 16384);
        assert!(resumed.accept(0, 4096).is_err());
        resumed.accept(8192, 8192).unwrap();
        resumed.finish().unwrap();
    }
}
