//! Text output of `kennel ctl` for people: sizes in binary units, tables like kubectl's.

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
