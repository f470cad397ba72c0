//! The LVM backend's StorageClass parameters and `--volume-group` flags.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::model::spec::{unknown_param, FsType};

pub const TYPE: &str = "type";
pub const THIN_POOL: &str = "thinPool";
pub const STRIPES: &str = "stripes";
pub const STRIPE_SIZE: &str = "stripeSize";
pub const DEVICE_CLASS: &str = "deviceClass";
pub const FS_TYPE: &str = "fsType";
pub const KNOWN: &[&str] = &[TYPE, THIN_POOL, STRIPES, STRIPE_SIZE, DEVICE_CLASS, FS_TYPE];

/// lvm2's own limit on stripes per segment.
pub const MAX_STRIPES: u32 = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    Linear,
    Thin { pool: String },
}

/// Parsed, validated backend parameters of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LvmParams {
    /// `None`: the driver's default (first) device class.
    pub device_class: Option<String>,
    pub layout: Layout,
    pub stripes: Option<u32>,
    /// Bytes.
    pub stripe_size: Option<u64>,
    pub fs_type: Option<FsType>,
}

impl LvmParams {
    pub fn parse(raw: &BTreeMap<String, String>) -> Result<Self> {
        for key in raw.keys() {
            if !KNOWN.contains(&key.as_str()) {
                return Err(unknown_param(key, "lvm", KNOWN));
            }
        }
        let get = |k: &str| raw.get(k).map(String::as_str);
        let layout = match (get(TYPE).unwrap_or("linear"), get(THIN_POOL)) {
            ("linear", None) => Layout::Linear,
            ("linear", Some(_)) => {
                return Err(Error::invalid(format!(
                    "parameter {THIN_POOL:?} needs {TYPE:?}: \"thin\""
                )))
            }
            ("thin", Some(pool)) => {
                check_lvm_name(THIN_POOL, pool)?;
                Layout::Thin {
                    pool: pool.to_owned(),
                }
            }
            ("thin", None) => {
                return Err(Error::invalid(format!(
                    "{TYPE:?}: \"thin\" needs parameter {THIN_POOL:?} (the thin pool LV in the device class's VG)"
                )))
            }
            (other, _) => {
                return Err(Error::invalid(format!(
                    "parameter {TYPE:?} must be \"linear\" or \"thin\", got {other:?}"
                )))
            }
        };
        let stripes = match get(STRIPES) {
            None => None,
            Some(raw) => {
                let n: u32 = raw.parse().map_err(|_| {
                    Error::invalid(format!(
                        "parameter {STRIPES:?} must be a number, got {raw:?}"
                    ))
                })?;
                if n == 0 || n > MAX_STRIPES {
                    return Err(Error::invalid(format!(
                        "parameter {STRIPES:?} must be between 1 and {MAX_STRIPES}, got {n}"
                    )));
                }
                Some(n)
            }
        };
        let stripe_size = match get(STRIPE_SIZE) {
            None => None,
            Some(raw) => {
                let bytes = crate::model::volume_size::parse_size(raw)
                    .map_err(|e| Error::invalid(format!("parameter {STRIPE_SIZE:?}: {e}")))?;
                if !bytes.is_power_of_two() || !(4096..=(1 << 30)).contains(&bytes) {
                    return Err(Error::invalid(format!(
                        "parameter {STRIPE_SIZE:?} must be a power of two between 4KiB and 1GiB, got {raw:?}"
                    )));
                }
                Some(bytes)
            }
        };
        if stripe_size.is_some() && stripes.is_none() {
            return Err(Error::invalid(format!(
                "parameter {STRIPE_SIZE:?} needs {STRIPES:?}"
            )));
        }
        if stripes.is_some() && layout != Layout::Linear {
            return Err(Error::invalid(format!(
                "parameter {STRIPES:?} applies to linear volumes; stripe the thin pool instead"
            )));
        }
        let fs_type = match get(FS_TYPE) {
            None => None,
            Some(raw) => FsType::parse(raw)?,
        };
        let device_class = get(DEVICE_CLASS).map(str::to_owned);
        Ok(LvmParams {
            device_class,
            layout,
            stripes,
            stripe_size,
            fs_type,
        })
    }

    /// More than one stripe: the LV is spread over several PVs.
    pub fn striped(&self) -> bool {
        self.stripes.is_some_and(|n| n > 1)
    }
}

/// A `--volume-group` flag: `VG` (the class is named after the VG) or `CLASS=VG`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceClass {
    pub name: String,
    pub vg: String,
}

impl DeviceClass {
    pub fn parse(raw: &str) -> Result<Self> {
        let (name, vg) = raw.split_once('=').unwrap_or((raw, raw));
        check_lvm_name("--volume-group", vg)?;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(Error::invalid(format!(
                "device class name {name:?} must be letters, digits, '-', '_' or '.'"
            )));
        }
        Ok(DeviceClass {
            name: name.to_owned(),
            vg: vg.to_owned(),
        })
    }
}

/// VG and LV names: lvm2's character set, no leading '-', not "." or "..".
fn check_lvm_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 127
        && !name.starts_with('-')
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{what} {name:?} is not a valid LVM name (letters, digits, '+', '_', '.', '-')"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<LvmParams> {
        LvmParams::parse(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults_and_layouts() {
        let p = parse(&[]).expect("test setup");
        assert_eq!(p.layout, Layout::Linear);
        assert_eq!(p.device_class, None);
        let p = parse(&[("type", "thin"), ("thinPool", "pool0"), ("fsType", "xfs")])
            .expect("test setup");
        assert_eq!(
            p.layout,
            Layout::Thin {
                pool: "pool0".into()
            }
        );
        assert_eq!(p.fs_type, Some(FsType::Xfs));
        let p = parse(&[
            ("stripes", "2"),
            ("stripeSize", "64KiB"),
            ("deviceClass", "fast"),
        ])
        .expect("test setup");
        assert_eq!(p.stripes, Some(2));
        assert_eq!(p.stripe_size, Some(64 << 10));
        assert_eq!(p.device_class.as_deref(), Some("fast"));
    }

    #[test]
    fn bad_parameters_are_invalid_arguments_naming_the_key() {
        for (pairs, key) in [
            (vec![("thinpool", "x")], "thinpool"),
            (vec![("type", "mirror")], "type"),
            (vec![("type", "thin")], "thinPool"),
            (vec![("thinPool", "p")], "thinPool"),
            (
                vec![("type", "thin"), ("thinPool", "a;rm -rf /")],
                "thinPool",
            ),
            (vec![("stripes", "0")], "stripes"),
            (vec![("stripes", "100000")], "stripes"),
            (vec![("stripes", "-1")], "stripes"),
            (vec![("stripes", "two")], "stripes"),
            (vec![("stripes", "2"), ("stripeSize", "3KiB")], "stripeSize"),
            (vec![("stripeSize", "64KiB")], "stripeSize"),
            (vec![("fsType", "ntfs")], "ntfs"),
        ] {
            match parse(&pairs) {
                Err(Error::InvalidArgument(msg)) => assert!(msg.contains(key), "{msg}"),
                other => panic!("{pairs:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn device_class_flags() {
        assert_eq!(
            DeviceClass::parse("vg0").expect("test setup"),
            DeviceClass {
                name: "vg0".into(),
                vg: "vg0".into()
            }
        );
        assert_eq!(
            DeviceClass::parse("fast=nvme-vg").expect("test setup"),
            DeviceClass {
                name: "fast".into(),
                vg: "nvme-vg".into()
            }
        );
        for bad in ["", "=vg", "a=", "x=-vg", "a b", "x=vg/../y"] {
            assert!(DeviceClass::parse(bad).is_err(), "{bad:?}");
        }
    }
}
