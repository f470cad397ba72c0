//! Kennel's state in LV tags.
//!
//! lvm2 tags allow only `[A-Za-z0-9_+.-/=!:&#]` and older releases cap them
//! at 128 characters, so a record is stored as hex of its JSON, cut into
//! numbered chunks:
//!
//! ```text
//! kennel.csi.dev                 owner: Kennel never touches an LV without it
//! kennel.csi.dev/n=3             how many chunks follow
//! kennel.csi.dev/r0=7b226964...  chunk 0 of the hex-encoded JSON record
//! kennel.csi.dev/pending         the LV is still being filled (see below)
//! ```
//!
//! Every tag is given in the `lvcreate` that creates the LV: lvm2 commits
//! the LV and its tags in one metadata write, so an LV is either absent or
//! fully described. An operation that needs more than one command (copying
//! data in, wiping old signatures) also sets `pending` in that `lvcreate` and
//! removes it last; an LV still pending is debris of an interrupted call.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

pub const OWNER: &str = "kennel.csi.dev";
pub const PENDING: &str = "kennel.csi.dev/pending";
const COUNT_PREFIX: &str = "kennel.csi.dev/n=";
const CHUNK_PREFIX: &str = "kennel.csi.dev/r";
/// Hex characters per chunk: with the prefix a tag stays under 128 characters.
const CHUNK_HEX: usize = 96;

/// The tags describing `record` (owner, count, chunks), in order.
pub fn encode<R: Serialize>(record: &R) -> Result<Vec<String>> {
    let json =
        serde_json::to_vec(record).map_err(|e| Error::Internal(format!("encode record: {e}")))?;
    let hex: String = json.iter().map(|b| format!("{b:02x}")).collect();
    let chunks: Vec<&str> = hex
        .as_bytes()
        .chunks(CHUNK_HEX)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    let mut tags = vec![OWNER.to_owned(), format!("{COUNT_PREFIX}{}", chunks.len())];
    tags.extend(
        chunks
            .iter()
            .enumerate()
            .map(|(i, chunk)| format!("{CHUNK_PREFIX}{i}={chunk}")),
    );
    Ok(tags)
}

/// What the tags of one LV say about it.
#[derive(Debug, PartialEq)]
pub enum Decoded<R> {
    /// No owner tag: not Kennel's, never touched.
    Foreign,
    /// Kennel's, but its creation never finished.
    Pending,
    Record(R),
}

pub fn is_owned(tags: &[String]) -> bool {
    tags.iter().any(|t| t == OWNER)
}

pub fn decode<R: DeserializeOwned>(tags: &[String]) -> Result<Decoded<R>> {
    if !is_owned(tags) {
        return Ok(Decoded::Foreign);
    }
    if tags.iter().any(|t| t == PENDING) {
        return Ok(Decoded::Pending);
    }
    let corrupt = |why: &str| Error::Internal(format!("corrupt Kennel LV tags: {why}"));
    let count: usize = tags
        .iter()
        .find_map(|t| t.strip_prefix(COUNT_PREFIX))
        .ok_or_else(|| corrupt("no chunk count"))?
        .parse()
        .map_err(|_| corrupt("bad chunk count"))?;
    // Each chunk is a tag of its own: a larger count is a lie (and must not
    // size an allocation).
    if count == 0 || count > tags.len() {
        return Err(corrupt("chunk count out of range"));
    }
    let mut chunks = vec![None; count];
    for tag in tags {
        let Some((index, chunk)) = tag
            .strip_prefix(CHUNK_PREFIX)
            .and_then(|rest| rest.split_once('='))
        else {
            continue;
        };
        let index: usize = index.parse().map_err(|_| corrupt("bad chunk index"))?;
        let slot = chunks
            .get_mut(index)
            .ok_or_else(|| corrupt("chunk index out of range"))?;
        *slot = Some(chunk);
    }
    let mut hex = String::new();
    for chunk in chunks {
        hex.push_str(chunk.ok_or_else(|| corrupt("missing chunk"))?);
    }
    let bytes = decode_hex(&hex).ok_or_else(|| corrupt("not hex"))?;
    serde_json::from_slice(&bytes)
        .map(Decoded::Record)
        .map_err(|e| corrupt(&e.to_string()))
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Whether lvm2 accepts `tag` (its documented character set).
pub fn is_valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+.-/=!:&#".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::VolumeRecord;
    use crate::volume::capacity::CapacityRange;
    use crate::volume::VolumeId;

    fn record(name: &str) -> VolumeRecord {
        VolumeRecord {
            id: VolumeId::generate(),
            name: name.to_owned(),
            capacity_bytes: 1 << 30,
            requested: CapacityRange {
                required: 1 << 30,
                limit: 0,
            },
            capabilities: vec![],
            params: Default::default(),
            node_id: "node-1".into(),
            machine_id: "m".into(),
            created_unix: 42,
            source: None,
        }
    }

    #[test]
    fn records_round_trip_through_valid_tags_in_any_order() {
        let hostile = "pvc-$(rm -rf /); `x` \"q\" 'a' ,=/\u{e9}\u{1f600}".repeat(6);
        let rec = record(&hostile);
        let mut tags = encode(&rec).expect("test setup");
        assert!(tags.len() > 4, "long names span several chunks");
        for tag in &tags {
            assert!(is_valid_tag(tag), "{tag:?}");
        }
        tags.reverse();
        tags.push("someone-elses-tag".into());
        assert_eq!(
            decode::<VolumeRecord>(&tags).expect("test setup"),
            Decoded::Record(rec)
        );
    }

    #[test]
    fn foreign_pending_and_damaged_lvs_are_told_apart() {
        assert_eq!(
            decode::<VolumeRecord>(&["other".to_owned()]).expect("test setup"),
            Decoded::Foreign
        );
        let mut tags = encode(&record("a")).expect("test setup");
        tags.push(PENDING.to_owned());
        assert_eq!(
            decode::<VolumeRecord>(&tags).expect("test setup"),
            Decoded::Pending
        );
        let mut tags = encode(&record("a")).expect("test setup");
        tags.pop();
        assert!(decode::<VolumeRecord>(&tags).is_err());
    }
}
