//! Text output of `kennel ctl` for people: sizes in binary units, tables like kubectl's.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::local_state::NodeState;
use super::View;

/// `67108864` → `64 MiB`; exact values keep no decimals, others one.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Columns padded to their widest cell, separated by three spaces, header first.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}   "));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `key: value` lines with the keys aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:")))
        .collect()
}

/// The text a person reads for a command's answer.
pub(super) fn text(view: View, value: &Value, wide: bool) -> String {
    match view {
        View::Volumes => volumes_table(value, wide),
        View::Snapshots => snapshots_table(value),
        View::Info | View::Capacity | View::Fields => fields_text(value),
    }
}

pub(super) fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) if s.is_empty() => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        Value::Bool(true) => "yes".to_owned(),
        Value::Bool(false) => "no".to_owned(),
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(scalar).collect();
            if parts.is_empty() {
                "-".to_owned()
            } else {
                parts.join(", ")
            }
        }
        Value::Object(map) => {
            let parts: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{k}={}", scalar(v)))
                .collect();
            if parts.is_empty() {
                "-".to_owned()
            } else {
                parts.join(", ")
            }
        }
        other => other.to_string(),
    }
}

pub(super) fn bytes(v: &Value) -> String {
    v.as_u64().map_or_else(|| scalar(v), size)
}

/// `key: value` lines; sizes in binary units, keys without their `_bytes` suffix.
pub(super) fn fields_text(value: &Value) -> String {
    let Value::Object(map) = value else {
        return format!("{}\n", scalar(value));
    };
    let pairs: Vec<(&str, String)> = map
        .iter()
        .map(|(k, v)| match k.strip_suffix("_bytes") {
            Some(short) => (short, bytes(v)),
            None if k.ends_with("_size") => (k.as_str(), bytes(v)),
            None => (k.as_str(), scalar(v)),
        })
        .collect();
    fields(&pairs)
}

/// `ext4` / `xfs` / `block` when mounted here.
pub(super) fn access_type(state: &Value) -> String {
    scalar(&state["fs_type"])
}

pub(super) fn volumes_table(value: &Value, wide: bool) -> String {
    let empty = Vec::new();
    let volumes = value["volumes"].as_array().unwrap_or(&empty);
    if volumes.is_empty() {
        return "No volumes.\n".to_owned();
    }
    let mut header = vec!["ID", "SIZE", "TYPE", "CLAIM", "STATE", "CONDITION"];
    if wide {
        header.extend(["PV", "NODE", "PARAMETERS"]);
    }
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            let state = &v["node_state"];
            let summary = serde_json::from_value::<NodeState>(state.clone())
                .map_or_else(|_| "-".to_owned(), |s| s.summary());
            let condition = if v["abnormal"] == true {
                scalar(&v["condition"])
            } else {
                "healthy".to_owned()
            };
            let mut row = vec![
                scalar(&v["volume_id"]),
                bytes(&v["capacity_bytes"]),
                access_type(state),
                scalar(&v["claim"]),
                summary,
                condition,
            ];
            if wide {
                let params: BTreeMap<&str, &Value> = v["volume_context"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| !k.contains('/'))
                    .map(|(k, v)| (k.as_str(), v))
                    .collect();
                row.extend([scalar(&v["pv"]), scalar(&v["node"]), scalar(&json!(params))]);
            }
            row
        })
        .collect();
    let mut out = table(&header, &rows);
    if let Some(token) = value["next_token"].as_str().filter(|t| !t.is_empty()) {
        out.push_str(&format!("(more: --starting-token {token})\n"));
    }
    out
}

pub(super) fn snapshots_table(value: &Value) -> String {
    let empty = Vec::new();
    let snapshots = value["snapshots"].as_array().unwrap_or(&empty);
    if snapshots.is_empty() {
        return "No snapshots.\n".to_owned();
    }
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|s| {
            let created = s["created_unix"]
                .as_i64()
                .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
                .map_or_else(
                    || "-".to_owned(),
                    |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
                );
            vec![
                scalar(&s["snapshot_id"]),
                scalar(&s["source_volume_id"]),
                bytes(&s["size_bytes"]),
                scalar(&s["ready_to_use"]),
                created,
            ]
        })
        .collect();
    table(&["ID", "SOURCE", "SIZE", "READY", "CREATED"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_binary_units() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(512), "512 B");
        assert_eq!(size(67_108_864), "64 MiB");
        assert_eq!(size(1_610_612_736), "1.5 GiB");
        assert_eq!(size(10 << 40), "10 TiB");
    }

    #[test]
    fn tables_align_columns() {
        let out = table(
            &["ID", "SIZE", "CLAIM"],
            &[
                vec!["kv-a".into(), "64 MiB".into(), "shop/data-0".into()],
                vec!["kv-long-id".into(), "1 GiB".into(), "-".into()],
            ],
        );
        assert_eq!(
            out,
            "ID           SIZE     CLAIM\n\
             kv-a         64 MiB   shop/data-0\n\
             kv-long-id   1 GiB    -\n"
        );
        assert_eq!(
            fields(&[("name", "x".into()), ("version", "1".into())]),
            "name:    x\nversion: 1\n"
        );
    }
}
