//! Kennel's state in LV tags.
//!
//! lvm2 tags allow only `[A-Za-z0-9_+.-/=!:&#]` and older releases cap them
//! at 128 characters, so a record is stored as its compact text (see
//! `record_text`) cut into numbered chunks, each saying how many there are:
//!
//! ```text
//! kennel.csi.dev                 owner: Kennel never touches an LV without it
//! k0/2=npvc-8f0e...              chunk 0 of 2 of the record's text
//! k1/2=...t1796250875            chunk 1 of 2
//! kennel.csi.dev/pending         the LV is still being filled (see below)
//! kio=rb10m+wi100                the volume's I/O limits, if any (see `io_limits_tag`)
//! ```
//!
//! lvm2 keeps every tag in the VG's metadata area, which is small (1 MiB by
//! default, two copies of the text): a record costs about 150 bytes there.
//! Drivers before this format stored hex of the record's JSON
//! (`kennel.csi.dev/n=3`, `kennel.csi.dev/r0=7b22...`), ten times larger;
//! those LVs are still read ([`legacy`]) and keep their tags.
//!
//! Every tag is given in the `lvcreate` that creates the LV: lvm2 commits
//! the LV and its tags in one metadata write, so an LV is either absent or
//! fully described. An operation that needs more than one command (copying
//! data in, wiping old signatures) also sets `pending` in that `lvcreate` and
//! removes it last; an LV still pending is debris of an interrupted call.

use serde::de::DeserializeOwned;

pub mod record_text;

use crate::error::{Error, Result};
pub use record_text::LvFacts;
use record_text::RecordText;

pub const OWNER: &str = "kennel.csi.dev";
pub const PENDING: &str = "kennel.csi.dev/pending";
const CHUNK_PREFIX: &str = "k";
/// Text per chunk: with its `kI/N=` prefix a tag stays within 128 characters.
const CHUNK_TEXT: usize = 120;
const MAX_CHUNKS: usize = 99;

/// A record Kennel keeps in tags: its compact text, or (written by older
/// drivers) JSON.
pub trait TagRecord: RecordText + DeserializeOwned {}
impl<R: RecordText + DeserializeOwned> TagRecord for R {}

/// The tags describing `record` (owner, then the chunks in order).
pub fn encode<R: TagRecord>(record: &R) -> Result<Vec<String>> {
    let text = record.to_text();
    let chunks: Vec<&str> = text
        .as_bytes()
        .chunks(CHUNK_TEXT)
        // The text is ASCII: any cut is on a character boundary.
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    if chunks.len() > MAX_CHUNKS {
        return Err(Error::invalid(format!(
            "the volume's description ({} bytes in LV tags) is too large to store",
            text.len()
        )));
    }
    let count = chunks.len();
    let mut tags = vec![OWNER.to_owned()];
    tags.extend(
        chunks
            .iter()
            .enumerate()
            .map(|(i, chunk)| format!("{CHUNK_PREFIX}{i}/{count}={chunk}")),
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

fn corrupt(why: &str) -> Error {
    Error::Internal(format!("corrupt Kennel LV tags: {why}"))
}

/// The record in the tags of the LV `lv` (which supplies what the record
/// does not store: its ID and size).
pub fn decode<R: TagRecord>(tags: &[String], lv: LvFacts<'_>) -> Result<Decoded<R>> {
    if !is_owned(tags) {
        return Ok(Decoded::Foreign);
    }
    if tags.iter().any(|t| t == PENDING) {
        return Ok(Decoded::Pending);
    }
    if legacy::is_legacy(tags) {
        return legacy::decode(tags).map(Decoded::Record);
    }
    let mut chunks: Vec<Option<&str>> = Vec::new();
    for tag in tags {
        let Some((key, chunk)) = tag
            .strip_prefix(CHUNK_PREFIX)
            .and_then(|rest| rest.split_once('='))
        else {
            continue;
        };
        let Some((index, count)) = key.split_once('/') else {
            continue;
        };
        // Not shaped like a chunk (`k0/2=`): someone else's tag.
        let number = |raw: &str| -> Option<usize> {
            let digits =
                !raw.is_empty() && raw.len() <= 2 && raw.bytes().all(|b| b.is_ascii_digit());
            digits.then(|| raw.parse().ok()).flatten()
        };
        let (Some(index), Some(count)) = (number(index), number(count)) else {
            continue;
        };
        if chunks.is_empty() {
            chunks = vec![None; count];
        }
        if count != chunks.len() || count == 0 {
            return Err(corrupt("chunks disagree on their count"));
        }
        let slot = chunks
            .get_mut(index)
            .ok_or_else(|| corrupt("chunk index out of range"))?;
        if slot.replace(chunk).is_some() {
            return Err(corrupt("a chunk given twice"));
        }
    }
    if chunks.is_empty() {
        return Err(corrupt("no record"));
    }
    let mut text = String::new();
    for chunk in chunks {
        text.push_str(chunk.ok_or_else(|| corrupt("missing chunk"))?);
    }
    R::from_text(&text, lv)
        .map(Decoded::Record)
        .map_err(|why| corrupt(&why))
}

/// The format of drivers before the compact text: hex of the record's JSON,
/// `kennel.csi.dev/n=<chunks>` and `kennel.csi.dev/r<i>=<hex>`. Read only.
pub mod legacy {
    use serde::de::DeserializeOwned;

    use super::corrupt;
    use crate::error::Result;

    const COUNT_PREFIX: &str = "kennel.csi.dev/n=";
    const CHUNK_PREFIX: &str = "kennel.csi.dev/r";

    pub fn is_legacy(tags: &[String]) -> bool {
        tags.iter().any(|t| t.starts_with(COUNT_PREFIX))
    }

    pub fn decode<R: DeserializeOwned>(tags: &[String]) -> Result<R> {
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
        serde_json::from_slice(&bytes).map_err(|e| corrupt(&e.to_string()))
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
    use crate::backend::{ContentSource, SnapshotRecord, VolumeRecord};
    use crate::model::spec::{AccessMode, AccessType, Capability, FsType, VolumeParams};
    use crate::model::volume_size::CapacityRange;
    use crate::model::{SnapshotId, VolumeId};

    /// A volume as Kubernetes makes them (csi-provisioner with
    /// --extra-create-metadata), restored from a snapshot.
    fn k8s_volume() -> VolumeRecord {
        VolumeRecord {
            id: VolumeId::parse("kv-3f9a0c2b7d1e4f5a6b8c9d0e").expect("test setup"),
            name: "pvc-8f0e3c2a-1b2c-4d5e-9f00-123456789abc".into(),
            capacity_bytes: 1 << 30,
            requested: CapacityRange {
                required: 1 << 30,
                limit: 0,
            },
            capabilities: vec![Capability {
                access_type: AccessType::Mount {
                    fs_type: Some(FsType::Ext4),
                    mount_flags: vec!["noatime".into()],
                },
                access_mode: AccessMode::SingleNodeWriter,
            }],
            params: VolumeParams {
                mkfs_discard: false,
                pvc_name: Some("data-web-0".into()),
                pvc_namespace: Some("default".into()),
                pv_name: Some("pvc-8f0e3c2a-1b2c-4d5e-9f00-123456789abc".into()),
                backend: [("deviceClass".to_owned(), "fast".to_owned())].into(),
                ..Default::default()
            },
            node_id: "worker-1".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            created_unix: 1796250875,
            source: Some(ContentSource::Snapshot(
                SnapshotId::parse("ks-0a1b2c3d4e5f6g7h8i9j0k1l").expect("test setup"),
            )),
        }
    }

    fn k8s_snapshot() -> SnapshotRecord {
        SnapshotRecord {
            id: SnapshotId::parse("ks-0a1b2c3d4e5f6g7h8i9j0k1l").expect("test setup"),
            name: "snapshot-4c1d2e3f-aaaa-bbbb-cccc-0123456789ab".into(),
            source_volume: VolumeId::parse("kv-3f9a0c2b7d1e4f5a6b8c9d0e").expect("test setup"),
            size_bytes: 1 << 30,
            created_unix: 1796250999,
            group: None,
        }
    }

    fn facts(name: &str, size: u64) -> LvFacts<'_> {
        LvFacts { name, size }
    }

    fn volume_back(tags: &[String], rec: &VolumeRecord) -> Result<Decoded<VolumeRecord>> {
        decode(tags, facts(rec.id.as_str(), rec.capacity_bytes))
    }

    /// Every field away from its default, and hostile strings everywhere.
    fn odd_volume() -> VolumeRecord {
        let hostile = "pvc-$(rm -rf /); `x` \"q\" 'a' ,=/+:k0/1=\u{e9}\u{1f600}".repeat(6);
        let mut rec = k8s_volume();
        rec.name = hostile.clone();
        rec.requested = CapacityRange {
            required: 1000,
            limit: 3 << 40,
        };
        rec.capabilities = vec![
            Capability {
                access_type: AccessType::Block,
                access_mode: AccessMode::SingleNodeMultiWriter,
            },
            Capability {
                access_type: AccessType::Mount {
                    fs_type: None,
                    mount_flags: vec![String::new(), "a+b".into(), hostile.clone()],
                },
                access_mode: AccessMode::SingleNodeReaderOnly,
            },
            Capability {
                access_type: AccessType::Mount {
                    fs_type: Some(FsType::Xfs),
                    mount_flags: vec![],
                },
                access_mode: AccessMode::SingleNodeSingleWriter,
            },
        ];
        rec.params = VolumeParams {
            mkfs_discard: true,
            pvc_name: Some(String::new()),
            pvc_namespace: None,
            pv_name: Some("pv/other".into()),
            backend: [
                ("layout".to_owned(), "thin=pool/x".to_owned()),
                (hostile.clone(), String::new()),
            ]
            .into(),
            ..Default::default()
        };
        rec.node_id = "node.example.com".into();
        rec.machine_id = hostile;
        rec.created_unix = 0;
        rec.source = Some(ContentSource::Volume(VolumeId::generate()));
        rec
    }

    #[test]
    fn records_round_trip_through_valid_tags_in_any_order() {
        let mut variants = vec![k8s_volume(), odd_volume()];
        let mut plain = k8s_volume();
        plain.params = VolumeParams::default();
        plain.capabilities.clear();
        plain.requested = CapacityRange {
            required: 0,
            limit: 0,
        };
        plain.source = None;
        variants.push(plain);
        let mut explicit_empty_pv = k8s_volume();
        explicit_empty_pv.params.pv_name = Some(String::new());
        variants.push(explicit_empty_pv);
        for rec in variants {
            let mut tags = encode(&rec).expect("test setup");
            for tag in &tags {
                assert!(is_valid_tag(tag), "{tag:?}");
            }
            tags.reverse();
            tags.push("someone-elses-tag".into());
            tags.push("kube/ns=x".into());
            assert_eq!(
                volume_back(&tags, &rec).expect("test setup"),
                Decoded::Record(rec.clone())
            );
        }
        let odd = odd_volume();
        assert!(
            encode(&odd).expect("test setup").len() > 4,
            "long records span several chunks"
        );

        let snap = k8s_snapshot();
        let tags = encode(&snap).expect("test setup");
        assert_eq!(
            decode::<SnapshotRecord>(&tags, facts(snap.id.as_str(), snap.size_bytes))
                .expect("test setup"),
            Decoded::Record(snap.clone())
        );

        // A group's member: its group and member count come back too, in a few bytes.
        let mut member = snap;
        member.group = Some(crate::backend::GroupMembership {
            id: crate::model::GroupSnapshotId::generate(),
            members: 3,
        });
        let tags = encode(&member).expect("test setup");
        assert_eq!(
            decode::<SnapshotRecord>(&tags, facts(member.id.as_str(), member.size_bytes))
                .expect("test setup"),
            Decoded::Record(member.clone())
        );
        let plain: usize = encode(&k8s_snapshot())
            .expect("test setup")
            .iter()
            .map(String::len)
            .sum();
        let grouped: usize = tags.iter().map(String::len).sum();
        assert!(
            grouped - plain <= 30,
            "a membership costs {} bytes",
            grouped - plain
        );
        for bad in [
            "gnot-an-id.3",
            "g0a1b2c3d4e5f6g7h8i9j0k1l.0",
            "g0a1b2c3d4e5f6g7h8i9j0k1l",
        ] {
            let text = format!("nsnap/fkv-3f9a0c2b7d1e4f5a6b8c9d0e/t1/{bad}");
            assert!(
                <SnapshotRecord as record_text::RecordText>::from_text(
                    &text,
                    facts("ks-0a1b2c3d4e5f6g7h8i9j0k1l", 1)
                )
                .is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn what_lvm2_knows_is_not_stored_but_read_from_the_lv() {
        let rec = k8s_volume();
        let tags = encode(&rec).expect("test setup");
        let text: String = tags.concat();
        assert!(!text.contains(rec.id.as_str()), "{text}");
        let Decoded::Record(back) =
            decode::<VolumeRecord>(&tags, facts(rec.id.as_str(), 5 << 30)).expect("test setup")
        else {
            panic!("no record");
        };
        assert_eq!(back.capacity_bytes, 5 << 30, "the size is the LV's");
        let other = VolumeId::generate();
        let Decoded::Record(moved) =
            decode::<VolumeRecord>(&tags, facts(other.as_str(), 1 << 30)).expect("test setup")
        else {
            panic!("no record");
        };
        assert_eq!(moved.id, other, "the ID is the LV's name");
        assert!(
            decode::<VolumeRecord>(&tags, facts("lvol0", 1 << 30)).is_err(),
            "an LV not named by a volume ID has no volume record"
        );
    }

    #[test]
    fn a_kubernetes_record_is_small() {
        let rec = k8s_volume();
        let tags = encode(&rec).expect("test setup");
        // As lvm2 writes them into its metadata: `"tag", ` each.
        let stored: usize = tags.iter().map(|t| t.len() + 4).sum();
        let legacy: usize = LEGACY_VOLUME.iter().map(|t| t.len() + 4).sum();
        assert!(stored <= 200, "{stored} bytes: {tags:?}");
        assert!(legacy > 6 * stored, "{legacy} vs {stored}");
    }

    #[test]
    fn foreign_pending_and_damaged_lvs_are_told_apart() {
        let rec = k8s_volume();
        assert_eq!(
            volume_back(&["other".to_owned()], &rec).expect("test setup"),
            Decoded::Foreign
        );
        let mut tags = encode(&rec).expect("test setup");
        tags.push(PENDING.to_owned());
        assert_eq!(
            volume_back(&tags, &rec).expect("test setup"),
            Decoded::Pending
        );

        let whole = encode(&odd_volume()).expect("test setup");
        let odd = odd_volume();
        let damaged = |change: &dyn Fn(&mut Vec<String>)| {
            let mut tags = whole.clone();
            change(&mut tags);
            volume_back(&tags, &odd)
        };
        assert!(damaged(&|t| {
            t.pop();
        })
        .is_err());
        assert!(damaged(&|t| {
            t.remove(1);
        })
        .is_err());
        assert!(damaged(&|t| t.push(t[1].clone())).is_err(), "a chunk twice");
        assert!(damaged(&|t| t.truncate(1)).is_err(), "owner alone");
        assert!(
            damaged(&|t| t[1] = t[1].replacen("/", "/9", 1)).is_err(),
            "counts disagree"
        );
        for text in [
            "npvc/ow/mm/t1/zextra",
            "npvc/ow/mm",
            "npvc/npvc/ow/mm/t1",
            "npvc/ow/mm/tsoon",
            "npvc/ow/mm/t1/cq",
            "npvc/ow/mm/t1/v/Vx",
            "npvc/ow/mm/t1/rlots",
            "npvc/ow/mm/t1/dyes",
            "npvc/ow/mm/t1/fkv-nope",
            "npvc/ow/mm/t1/bnoequals",
            "npvc/ow/mm/t1/cbw+x",
            "n:zz/ow/mm/t1",
            "",
        ] {
            let tags = vec![OWNER.to_owned(), format!("k0/1={text}")];
            assert!(volume_back(&tags, &rec).is_err(), "{text:?}");
        }
        let fine = vec![OWNER.to_owned(), "k0/1=npvc/ow/mm/t1".to_owned()];
        assert!(matches!(
            volume_back(&fine, &rec).expect("test setup"),
            Decoded::Record(_)
        ));
    }

    /// Written by the driver before the compact format (its encoder, on
    /// [`k8s_volume`] and [`k8s_snapshot`]).
    const LEGACY_VOLUME: [&str; 15] = [
        "kennel.csi.dev",
        "kennel.csi.dev/n=13",
        "kennel.csi.dev/r0=7b226964223a226b762d336639613063326237643165346635613662386339643065222c226e616d65223a227076632d",
        "kennel.csi.dev/r1=38663065336332612d316232632d346435652d396630302d313233343536373839616263222c2263617061636974795f",
        "kennel.csi.dev/r2=6279746573223a313037333734313832342c22726571756573746564223a7b227265717569726564223a313037333734",
        "kennel.csi.dev/r3=313832342c226c696d6974223a307d2c226361706162696c6974696573223a5b7b226163636573735f74797065223a7b",
        "kennel.csi.dev/r4=226b696e64223a226d6f756e74222c2266735f74797065223a2265787434222c226d6f756e745f666c616773223a5b22",
        "kennel.csi.dev/r5=6e6f6174696d65225d7d2c226163636573735f6d6f6465223a2253696e676c654e6f6465577269746572227d5d2c2270",
        "kennel.csi.dev/r6=6172616d73223a7b226d6b66735f64697363617264223a66616c73652c227076635f6e616d65223a22646174612d7765",
        "kennel.csi.dev/r7=622d30222c227076635f6e616d657370616365223a2264656661756c74222c2270765f6e616d65223a227076632d3866",
        "kennel.csi.dev/r8=3065336332612d316232632d346435652d396630302d313233343536373839616263222c226261636b656e64223a7b22",
        "kennel.csi.dev/r9=646576696365436c617373223a2266617374227d7d2c226e6f64655f6964223a22776f726b65722d31222c226d616368",
        "kennel.csi.dev/r10=696e655f6964223a223031323334353637383961626364656630313233343536373839616263646566222c2263726561",
        "kennel.csi.dev/r11=7465645f756e6978223a313739363235303837352c22736f75726365223a7b22736e617073686f74223a226b732d3061",
        "kennel.csi.dev/r12=31623263336434653566366737683869396a306b316c227d7d",
    ];

    const LEGACY_SNAPSHOT: [&str; 6] = [
        "kennel.csi.dev",
        "kennel.csi.dev/n=4",
        "kennel.csi.dev/r0=7b226964223a226b732d306131623263336434653566366737683869396a306b316c222c226e616d65223a22736e6170",
        "kennel.csi.dev/r1=73686f742d34633164326533662d616161612d626262622d636363632d303132333435363738396162222c22736f7572",
        "kennel.csi.dev/r2=63655f766f6c756d65223a226b762d336639613063326237643165346635613662386339643065222c2273697a655f62",
        "kennel.csi.dev/r3=79746573223a313037333734313832342c22637265617465645f756e6978223a313739363235303939397d",
    ];

    #[test]
    fn tags_written_by_earlier_drivers_are_still_read() {
        let owned = |tags: &[&str]| -> Vec<String> {
            let mut tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
            tags.reverse();
            tags
        };
        let rec = k8s_volume();
        assert_eq!(
            volume_back(&owned(&LEGACY_VOLUME), &rec).expect("legacy volume"),
            Decoded::Record(rec.clone())
        );
        let snap = k8s_snapshot();
        assert_eq!(
            decode::<SnapshotRecord>(
                &owned(&LEGACY_SNAPSHOT),
                facts(snap.id.as_str(), snap.size_bytes)
            )
            .expect("legacy snapshot"),
            Decoded::Record(snap)
        );
        let mut pending = owned(&LEGACY_VOLUME);
        pending.push(PENDING.to_owned());
        assert_eq!(
            volume_back(&pending, &rec).expect("test setup"),
            Decoded::Pending
        );
        let mut cut = owned(&LEGACY_VOLUME);
        cut.retain(|t| !t.starts_with("kennel.csi.dev/r12="));
        assert!(volume_back(&cut, &rec).is_err());
    }
}
