//! ListVolumes pagination tokens: the last ID of the previous page. A cursor
//! (not an offset) so that deletions between pages skip nothing.

use std::fmt::Display;

use crate::error::{Error, Result};

const TOKEN_PREFIX: &str = "after:";

/// IDs that can be paged over: sortable, printable, and parsed back strictly.
pub trait Cursor: Ord + Display + Sized {
    fn parse_cursor(raw: &str) -> Option<Self>;
}

impl Cursor for crate::model::VolumeId {
    fn parse_cursor(raw: &str) -> Option<Self> {
        Self::parse(raw)
    }
}

impl Cursor for crate::model::SnapshotId {
    fn parse_cursor(raw: &str) -> Option<Self> {
        Self::parse(raw)
    }
}

pub fn encode(last: &impl Display) -> String {
    format!("{TOKEN_PREFIX}{last}")
}

/// `None` for the first page.
pub fn decode<K: Cursor>(token: &str) -> Result<Option<K>> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .strip_prefix(TOKEN_PREFIX)
        .and_then(K::parse_cursor)
        .map(Some)
        .ok_or_else(|| Error::BadToken(token.to_owned()))
}

/// One page of `items` (sorted by ID) after `token`, plus the next token.
pub fn page<T, K: Cursor>(
    items: Vec<T>,
    id_of: impl Fn(&T) -> &K,
    token: &str,
    max_entries: i32,
) -> Result<(Vec<T>, String)> {
    if max_entries < 0 {
        return Err(Error::invalid("max_entries must not be negative"));
    }
    let after = decode(token)?;
    let mut rest: Vec<T> = items
        .into_iter()
        .filter(|item| after.as_ref().is_none_or(|a| id_of(item) > a))
        .collect();
    let limit = if max_entries == 0 {
        usize::MAX
    } else {
        max_entries as usize
    };
    let next = if rest.len() > limit {
        rest.truncate(limit);
        rest.last()
            .map(|item| encode(id_of(item)))
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok((rest, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::VolumeId;

    fn ids(n: usize) -> Vec<VolumeId> {
        let mut v: Vec<_> = (0..n).map(|_| VolumeId::generate()).collect();
        v.sort();
        v
    }

    #[test]
    fn pages_cover_everything_once() {
        let all = ids(7);
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let (page, next) = page(all.clone(), |i| i, &token, 3).unwrap();
            assert!(page.len() <= 3);
            seen.extend(page);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, all);
    }

    #[test]
    fn deleting_the_cursor_volume_skips_nothing() {
        let all = ids(5);
        let (first, next) = page(all.clone(), |i| i, "", 2).unwrap();
        let remaining: Vec<_> = all.iter().filter(|i| **i != first[1]).cloned().collect();
        let (second, _) = page(remaining, |i| i, &next, 0).unwrap();
        assert_eq!(second, all[2..].to_vec());
    }

    #[test]
    fn foreign_tokens_are_rejected() {
        for bad in ["garbage", "after:../x", "after:", "10"] {
            assert!(
                matches!(decode::<VolumeId>(bad), Err(Error::BadToken(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            page(ids(1), |i| i, "", -1),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn no_next_token_when_page_is_exact() {
        let all = ids(3);
        let (page, next) = page(all, |i| i, "", 3).unwrap();
        assert_eq!(page.len(), 3);
        assert!(next.is_empty());
    }
}
