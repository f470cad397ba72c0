//! The compact text of a record kept in LV tags (see `tags`).
//!
//! Every byte of it is stored twice in each of the VG's metadata areas, so it
//! holds only what cannot be read back from lvm2 and leaves out defaults:
//! the ID is the LV's name, the size is the LV's size. A record is a list of
//! fields separated by `/`, each a one-letter key and its value:
//!
//! ```text
//! npvc-+CPDjwqGyxNXp8AEjRWeJq8/r1g/cew+noatime/pdata-web-0/qdefault/bdeviceClass=fast/oworker-1/m!ABI0VniavN7wEjRWeJq83v/t1796250875
//! ```
//!
//! Values keep `[A-Za-z0-9_.-]` and write any other byte as `:` and two hex
//! digits, so `/`, `=`, `+` and `!` only ever separate. Names that end in a
//! UUID (`pvc-<uid>`, as Kubernetes names volumes) or in 32 hex digits (a
//! machine ID) keep those 16 bytes in base64 after `+` or `!`. Sizes are
//! written with a binary suffix when they are whole kibibytes (`k`),
//! mebibytes (`m`) and so on. The PV name is left out when it is the
//! volume's name (csi-provisioner names volumes after their PV).

use std::collections::BTreeMap;

use crate::backend::{GroupMembership, SnapshotRecord, VolumeRecord};
use crate::model::spec::{AccessMode, AccessType, Capability, FsType, VolumeParams};
use crate::model::volume_size::CapacityRange;
use crate::model::ContentSource;
use crate::model::{GroupSnapshotId, SnapshotId, VolumeId};

/// What lvm2 knows about the LV itself: the fields a record does not store.
#[derive(Debug, Clone, Copy)]
pub struct LvFacts<'a> {
    pub name: &'a str,
    pub size: u64,
}

/// A record that has a compact text.
pub trait RecordText: Sized {
    fn to_text(&self) -> String;
    fn from_text(text: &str, lv: LvFacts<'_>) -> Result<Self, String>;
}

const SEPARATOR: char = '/';

/// `value` with every byte outside `[A-Za-z0-9_.-]` written as `:xx`.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"_.-".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!(":{b:02x}"));
        }
    }
    out
}

pub fn unescape(raw: &str) -> Result<String, String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b':' {
            let hex = raw
                .get(i + 1..i + 3)
                .ok_or_else(|| format!("cut escape in {raw:?}"))?;
            let byte =
                u8::from_str_radix(hex, 16).map_err(|_| format!("bad escape :{hex} in {raw:?}"))?;
            out.push(byte);
            i += 3;
        } else if b.is_ascii_alphanumeric() || b"_.-".contains(&b) {
            out.push(b);
            i += 1;
        } else {
            return Err(format!("unexpected {:?} in {raw:?}", b as char));
        }
    }
    String::from_utf8(out).map_err(|_| format!("{raw:?} is not UTF-8"))
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
/// Marks a UUID tail (`8-4-4-4-12` hex digits) and a 32-hex-digit tail.
const UUID_TAIL: char = '+';
const HEX_TAIL: char = '!';

fn b64_of(bytes: &[u8; 16]) -> String {
    let mut n = u128::from_be_bytes(*bytes);
    // 22 characters of 6 bits hold 132 bits: the first carries the top 2.
    let mut out = [0u8; 22];
    for slot in out.iter_mut().rev() {
        *slot = B64[(n & 63) as usize];
        n >>= 6;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn b64_parse(raw: &str) -> Option<[u8; 16]> {
    if raw.len() != 22 {
        return None;
    }
    let mut n: u128 = 0;
    for (i, c) in raw.bytes().enumerate() {
        let v = B64.iter().position(|b| *b == c)? as u128;
        if i == 0 && v > 3 {
            return None;
        }
        n = (n << 6) | v;
    }
    Some(n.to_be_bytes())
}

fn hex_bytes(hex: &str) -> Option<[u8; 16]> {
    if hex.len() != 32 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u128::from_str_radix(hex, 16).ok().map(u128::to_be_bytes)
}

/// A name, escaped, its UUID or hex tail (lowercase only: it must come back
/// the same) in base64.
pub fn squeeze(value: &str) -> String {
    let split = |len: usize| {
        value
            .len()
            .checked_sub(len)
            .filter(|at| value.is_char_boundary(*at))
    };
    if let Some(at) = split(36) {
        let tail = &value[at..];
        let dashes = [8, 13, 18, 23].iter().all(|i| tail.as_bytes()[*i] == b'-');
        if dashes {
            if let Some(bytes) = hex_bytes(&tail.replace('-', "")) {
                return format!("{}{UUID_TAIL}{}", escape(&value[..at]), b64_of(&bytes));
            }
        }
    }
    if let Some(at) = split(32) {
        if let Some(bytes) = hex_bytes(&value[at..]) {
            return format!("{}{HEX_TAIL}{}", escape(&value[..at]), b64_of(&bytes));
        }
    }
    escape(value)
}

pub fn unsqueeze(raw: &str) -> Result<String, String> {
    let Some(at) = raw.find([UUID_TAIL, HEX_TAIL]) else {
        return unescape(raw);
    };
    let bytes = b64_parse(&raw[at + 1..]).ok_or_else(|| format!("bad tail in {raw:?}"))?;
    let hex = format!("{:032x}", u128::from_be_bytes(bytes));
    let tail = if raw[at..].starts_with(UUID_TAIL) {
        format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        )
    } else {
        hex
    };
    Ok(unescape(&raw[..at])? + &tail)
}

const SUFFIXES: [(char, u32); 6] = [
    ('e', 60),
    ('p', 50),
    ('t', 40),
    ('g', 30),
    ('m', 20),
    ('k', 10),
];

/// `n` bytes, shortest: `1g` for a gibibyte.
pub fn size(n: u64) -> String {
    if n != 0 {
        for (suffix, shift) in SUFFIXES {
            if n.trailing_zeros() >= shift {
                return format!("{}{suffix}", n >> shift);
            }
        }
    }
    n.to_string()
}

pub fn parse_size(raw: &str) -> Result<u64, String> {
    let bad = || format!("bad size {raw:?}");
    let (digits, shift) = match raw.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let shift = SUFFIXES
                .iter()
                .find(|(s, _)| *s == c)
                .map(|(_, shift)| *shift)
                .ok_or_else(bad)?;
            (&raw[..raw.len() - 1], shift)
        }
        _ => (raw, 0),
    };
    let n = parse_number(digits).ok_or_else(bad)?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

fn parse_number(raw: &str) -> Option<u64> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    raw.parse().ok()
}

/// Fields in the order they were written, each checked to appear once
/// unless it is a list.
struct Fields<'a> {
    fields: Vec<(char, &'a str)>,
}

impl<'a> Fields<'a> {
    fn parse(text: &'a str, known: &str, lists: &str) -> Result<Self, String> {
        let mut fields = Vec::new();
        for field in text.split(SEPARATOR) {
            let mut chars = field.chars();
            let key = chars.next().ok_or("an empty field")?;
            if !known.contains(key) {
                return Err(format!(
                    "unknown field {key:?} (written by a newer Kennel?)"
                ));
            }
            if !lists.contains(key) && fields.iter().any(|(k, _)| *k == key) {
                return Err(format!("field {key:?} given twice"));
            }
            fields.push((key, chars.as_str()));
        }
        Ok(Fields { fields })
    }

    fn raw(&self, key: char) -> Option<&'a str> {
        self.fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    fn all(&self, key: char) -> impl Iterator<Item = &'a str> + '_ {
        self.fields
            .iter()
            .filter(move |(k, _)| *k == key)
            .map(|(_, v)| *v)
    }

    fn text(&self, key: char) -> Result<Option<String>, String> {
        self.raw(key).map(unsqueeze).transpose()
    }

    fn required(&self, key: char) -> Result<String, String> {
        self.text(key)?
            .ok_or_else(|| format!("field {key:?} is missing"))
    }

    fn size(&self, key: char) -> Result<u64, String> {
        self.raw(key).map_or(Ok(0), parse_size)
    }

    fn unix(&self, key: char) -> Result<u64, String> {
        let raw = self
            .raw(key)
            .ok_or_else(|| format!("field {key:?} is missing"))?;
        parse_number(raw).ok_or_else(|| format!("bad time {raw:?}"))
    }
}

/// Writes fields, leaving out the ones at their default.
#[derive(Default)]
struct Writer(String);

impl Writer {
    fn raw(&mut self, key: char, value: &str) {
        if !self.0.is_empty() {
            self.0.push(SEPARATOR);
        }
        self.0.push(key);
        self.0.push_str(value);
    }

    fn text(&mut self, key: char, value: &str) {
        self.raw(key, &squeeze(value));
    }

    fn optional(&mut self, key: char, value: &Option<String>) {
        if let Some(value) = value {
            self.text(key, value);
        }
    }

    fn size(&mut self, key: char, n: u64) {
        if n != 0 {
            self.raw(key, &size(n));
        }
    }
}

/// `b` block, `m` mount (driver's default filesystem), `e` ext4, `x` xfs;
/// then `w`/`r`/`s`/`m` for the access mode; then `+flag` per mount flag.
fn capability(cap: &Capability) -> String {
    let (kind, flags): (char, &[String]) = match &cap.access_type {
        AccessType::Block => ('b', &[]),
        AccessType::Mount {
            fs_type,
            mount_flags,
        } => (
            match fs_type {
                None => 'm',
                Some(FsType::Ext4) => 'e',
                Some(FsType::Xfs) => 'x',
            },
            mount_flags,
        ),
    };
    let mode = match cap.access_mode {
        AccessMode::SingleNodeWriter => 'w',
        AccessMode::SingleNodeReaderOnly => 'r',
        AccessMode::SingleNodeSingleWriter => 's',
        AccessMode::SingleNodeMultiWriter => 'm',
    };
    let mut out = format!("{kind}{mode}");
    for flag in flags {
        out.push('+');
        out.push_str(&escape(flag));
    }
    out
}

fn parse_capability(raw: &str) -> Result<Capability, String> {
    let bad = || format!("bad capability {raw:?}");
    let mut parts = raw.split('+');
    let head = parts.next().unwrap_or_default();
    let mut head_chars = head.chars();
    let (Some(kind), Some(mode), None) = (head_chars.next(), head_chars.next(), head_chars.next())
    else {
        return Err(bad());
    };
    let mount_flags = parts.map(unescape).collect::<Result<Vec<_>, _>>()?;
    let mount = |fs_type| AccessType::Mount {
        fs_type,
        mount_flags: mount_flags.clone(),
    };
    let access_type = match kind {
        'b' if mount_flags.is_empty() => AccessType::Block,
        'm' => mount(None),
        'e' => mount(Some(FsType::Ext4)),
        'x' => mount(Some(FsType::Xfs)),
        _ => return Err(bad()),
    };
    let access_mode = match mode {
        'w' => AccessMode::SingleNodeWriter,
        'r' => AccessMode::SingleNodeReaderOnly,
        's' => AccessMode::SingleNodeSingleWriter,
        'm' => AccessMode::SingleNodeMultiWriter,
        _ => return Err(bad()),
    };
    Ok(Capability {
        access_type,
        access_mode,
    })
}

fn source(source: &ContentSource) -> &str {
    match source {
        ContentSource::Snapshot(id) => id.as_str(),
        ContentSource::Volume(id) => id.as_str(),
    }
}

/// IDs carry their kind in their prefix.
fn parse_source(raw: &str) -> Result<ContentSource, String> {
    if let Some(id) = SnapshotId::parse(raw) {
        return Ok(ContentSource::Snapshot(id));
    }
    VolumeId::parse(raw)
        .map(ContentSource::Volume)
        .ok_or_else(|| format!("bad source {raw:?}"))
}

impl RecordText for VolumeRecord {
    fn to_text(&self) -> String {
        let mut w = Writer::default();
        w.text('n', &self.name);
        w.size('r', self.requested.required);
        w.size('l', self.requested.limit);
        for cap in &self.capabilities {
            w.raw('c', &capability(cap));
        }
        let params = &self.params;
        if params.mkfs_discard {
            w.raw('d', "");
        }
        w.optional('p', &params.pvc_name);
        w.optional('q', &params.pvc_namespace);
        // csi-provisioner names a volume after its PV: that is the default.
        match &params.pv_name {
            Some(pv) if *pv == self.name => {}
            None => w.raw('v', ""),
            other => w.optional('V', other),
        }
        for (key, value) in &params.backend {
            w.raw('b', &format!("{}={}", escape(key), escape(value)));
        }
        w.text('o', &self.node_id);
        w.text('m', &self.machine_id);
        w.raw('t', &self.created_unix.to_string());
        if let Some(from) = &self.source {
            w.raw('f', source(from));
        }
        w.0
    }

    fn from_text(text: &str, lv: LvFacts<'_>) -> Result<Self, String> {
        let f = Fields::parse(text, "nrlcdpqvVbomtf", "cb")?;
        let id =
            VolumeId::parse(lv.name).ok_or_else(|| format!("{:?} is no volume ID", lv.name))?;
        let name = f.required('n')?;
        let mut backend = BTreeMap::new();
        for pair in f.all('b') {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("bad parameter {pair:?}"))?;
            backend.insert(unescape(key)?, unescape(value)?);
        }
        let pv_name = match (f.raw('v'), f.text('V')?) {
            (Some(""), None) => None,
            (None, None) => Some(name.clone()),
            (None, explicit) => explicit,
            _ => return Err("bad PV name".to_owned()),
        };
        if f.raw('d').is_some_and(|v| !v.is_empty()) {
            return Err("bad mkfs discard flag".to_owned());
        }
        Ok(VolumeRecord {
            id,
            requested: CapacityRange {
                required: f.size('r')?,
                limit: f.size('l')?,
            },
            capacity_bytes: lv.size,
            capabilities: f.all('c').map(parse_capability).collect::<Result<_, _>>()?,
            params: VolumeParams {
                mkfs_discard: f.raw('d').is_some(),
                pvc_name: f.text('p')?,
                pvc_namespace: f.text('q')?,
                pv_name,
                backend,
                // Kept in a tag of their own (see `io_limits_tag`), read beside the record.
                io_limits: Default::default(),
            },
            node_id: f.required('o')?,
            machine_id: f.required('m')?,
            created_unix: f.unix('t')?,
            source: f.raw('f').map(parse_source).transpose()?,
            name,
        })
    }
}

impl RecordText for SnapshotRecord {
    fn to_text(&self) -> String {
        let mut w = Writer::default();
        w.text('n', &self.name);
        w.raw('f', self.source_volume.as_str());
        w.raw('t', &self.created_unix.to_string());
        if let Some(group) = &self.group {
            // The ID without its prefix, then the member count: `g<24 chars>.<members>`.
            let random = &group.id.as_str()[GroupSnapshotId::PREFIX.len()..];
            w.raw('g', &format!("{random}.{}", group.members));
        }
        w.0
    }

    fn from_text(text: &str, lv: LvFacts<'_>) -> Result<Self, String> {
        let f = Fields::parse(text, "nftg", "")?;
        let raw_source = f.raw('f').ok_or("field 'f' is missing")?;
        Ok(SnapshotRecord {
            id: SnapshotId::parse(lv.name)
                .ok_or_else(|| format!("{:?} is no snapshot ID", lv.name))?,
            name: f.required('n')?,
            source_volume: VolumeId::parse(raw_source)
                .ok_or_else(|| format!("bad source volume {raw_source:?}"))?,
            size_bytes: lv.size,
            created_unix: f.unix('t')?,
            group: f.raw('g').map(parse_group).transpose()?,
        })
    }
}

fn parse_group(raw: &str) -> Result<GroupMembership, String> {
    let bad = || format!("bad group {raw:?}");
    let (random, members) = raw.split_once('.').ok_or_else(bad)?;
    Ok(GroupMembership {
        id: GroupSnapshotId::parse(&format!("{}{random}", GroupSnapshotId::PREFIX))
            .ok_or_else(bad)?,
        members: parse_number(members)
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n > 0)
            .ok_or_else(bad)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_keeps_plain_names_and_round_trips_anything() {
        assert_eq!(escape("pvc-1.a_B"), "pvc-1.a_B");
        assert_eq!(escape("a/b=c+d:e f"), "a:2fb:3dc:2bd:3ae:20f");
        for s in ["", "é😀", "::", ":2f", "x\u{0}y", "$(rm -rf /)"] {
            assert_eq!(unescape(&escape(s)).as_deref(), Ok(s), "{s:?}");
            assert!(escape(s)
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-:".contains(&b)));
        }
        for bad in [":", ":4", ":zz", "a/b", "a b", ":ff"] {
            assert!(unescape(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn uuid_and_hex_tails_shrink_and_come_back_exactly() {
        let pvc = "pvc-8f0e3c2a-1b2c-4d5e-9f00-123456789abc";
        assert_eq!(squeeze(pvc).len(), 4 + 1 + 22);
        let machine = "0123456789abcdef0123456789abcdef";
        assert_eq!(squeeze(machine), "!ABI0VniavN7wEjRWeJq83v");
        for s in [
            pvc,
            machine,
            "8f0e3c2a-1b2c-4d5e-9f00-123456789abc",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
            "00000000000000000000000000000000",
            "é/pvc-8f0e3c2a-1b2c-4d5e-9f00-123456789abc",
            // Not lowercase, or not quite a UUID: kept as they are.
            "pvc-8F0E3C2A-1B2C-4D5E-9F00-123456789ABC",
            "pvc-8f0e3c2a-1b2c-4d5e-9f00_123456789abc",
            "0123456789abcdef0123456789abcdeg",
            "😀😀😀😀😀😀😀😀😀",
            "x",
            "",
        ] {
            let squeezed = squeeze(s);
            assert_eq!(
                unsqueeze(&squeezed).as_deref(),
                Ok(s),
                "{s:?} as {squeezed:?}"
            );
        }
        assert_eq!(
            squeeze("pvc-8F0E3C2A-1B2C-4D5E-9F00-123456789ABC").len(),
            40
        );
        for bad in [
            "+",
            "x+short",
            "!ASNFZ4mrze8BI0VniavN7",
            "+ZZZZZZZZZZZZZZZZZZZZZZ",
            "a+b+c",
        ] {
            assert!(unsqueeze(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_are_short_and_exact() {
        assert_eq!(size(0), "0");
        assert_eq!(size(1 << 30), "1g");
        assert_eq!(size(3 << 20), "3m");
        assert_eq!(size(1536 << 20), "1536m");
        assert_eq!(size(1000), "1000");
        assert_eq!(size(u64::MAX), u64::MAX.to_string());
        assert_eq!(size(1 << 63), "8e");
        for n in [0, 1, 1000, 4096, 1 << 30, 5 << 40, u64::MAX, 1 << 63] {
            assert_eq!(parse_size(&size(n)), Ok(n), "{n}");
        }
        for bad in ["", "g", "1x", "-1", "16e", "99999999999999999999", "1 g"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }
}
