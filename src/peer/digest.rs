//! SHA-256 of a snapshot or a destination's first bytes, read at offsets so a block device and
//! an image file are read alike. `ring` computes it in assembly, fast in any build profile.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use ring::digest::{Context, SHA256};

/// Size of the reads; also the largest data chunk on the wire.
pub const BLOCK: usize = 1 << 20;

pub type Sha256 = [u8; 32];

/// SHA-256 of the `size` bytes of `file` from `base`. Blocking: call it off the async runtime.
/// A file shorter than that is an error, not a hash of fewer bytes.
pub fn sha256_of(file: &File, base: u64, size: u64) -> io::Result<Sha256> {
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; BLOCK];
    let mut offset = 0u64;
    while offset < size {
        let len = usize::try_from(size - offset).map_or(BLOCK, |left| left.min(BLOCK));
        let block = &mut buf[..len];
        file.read_exact_at(block, base + offset)?;
        ctx.update(block);
        offset += len as u64;
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}

/// Lowercase hex, for logs and errors.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn hashes_the_first_bytes_only_and_refuses_short_files() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"abcdef").unwrap();
        // SHA-256("abc").
        assert_eq!(
            hex(&sha256_of(&f, 0, 3).unwrap()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&sha256_of(&f, 0, 0).unwrap()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let err = sha256_of(&f, 0, 7).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        // From an offset: SHA-256("def"); past the end is short.
        assert_eq!(
            hex(&sha256_of(&f, 3, 3).unwrap()),
            "cb8379ac2098aa165029e3938a51da0bcecfc008fd6795f401178647f96c5b34"
        );
        let err = sha256_of(&f, 4, 3).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn blocks_larger_than_one_read_hash_like_one_pass() {
        let data: Vec<u8> = (0..BLOCK * 2 + 7).map(|i| (i * 31 % 251) as u8).collect();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&data).unwrap();
        let whole = ring::digest::digest(&SHA256, &data);
        assert_eq!(sha256_of(&f, 0, data.len() as u64).unwrap(), whole.as_ref());
    }
}
