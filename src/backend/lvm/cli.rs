//! lvm2's command-line tools as typed calls: argument lists (never a shell),
//! JSON reports decoded with serde, failures turned into domain errors that
//! keep lvm2's own message. The commands run through the node's one runner
//! ([`crate::node::cmd`]): reports are read-only and killed at their deadline,
//! every other lvm2 command may change metadata and is never killed.

use std::ffi::OsString;
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};
use crate::node::cmd::{Effect, Tool};

/// Environment variable naming the mutating step after which the process
/// aborts (fault injection for crash-safety tests). Only builds with the
/// `crash-injection` feature read it.
#[cfg(feature = "crash-injection")]
pub const ABORT_AFTER_STEP_ENV: &str = "KENNEL_LVM_ABORT_AFTER_STEP";

/// How lvm2 is invoked on this host.
#[derive(Debug)]
pub struct Lvm {
    /// `--driverloaded n`: lvm2 edits metadata only and never talks to
    /// device-mapper (kernels without it).
    no_device_mapper: bool,
    /// A `--config` string, if any.
    config: Option<String>,
    /// The PVs lvm2 may scan (`--devices`), once they are known: scanning
    /// every block device of a host costs far more than the command itself.
    /// Shared with readers, and replaced when the VGs' PVs change.
    devices: Arc<RwLock<Vec<String>>>,
    /// The deadline of each command (lvm2's own lock waits included); by
    /// default `--command-timeout`.
    timeout: Option<Duration>,
    /// Mutating steps taken so far and the step to abort after (tests).
    steps: AtomicUsize,
    abort_after: Option<usize>,
}

impl Lvm {
    pub fn new(no_device_mapper: bool, no_udev: bool) -> Self {
        let mut config = Vec::new();
        if no_device_mapper || no_udev {
            // Nobody would answer udev cookies: lvm2 manages /dev itself.
            config.push("activation{udev_sync=0 udev_rules=0 monitoring=0}");
            config.push("devices{obtain_device_list_from_udev=0}");
        }
        Lvm {
            no_device_mapper,
            config: (!config.is_empty()).then(|| config.join(" ")),
            devices: Arc::default(),
            timeout: None,
            steps: AtomicUsize::new(0),
            abort_after: abort_after_step(),
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Another handle with the same options (and the same PVs, following
    /// their changes), for a reader thread.
    pub fn reader(&self) -> Lvm {
        Lvm {
            no_device_mapper: self.no_device_mapper,
            config: self.config.clone(),
            devices: self.devices.clone(),
            timeout: self.timeout,
            steps: AtomicUsize::new(0),
            abort_after: None,
        }
    }

    /// A reader that scans every device (to find PVs the list lacks).
    pub fn unscoped(&self) -> Lvm {
        Lvm {
            devices: Arc::default(),
            ..self.reader()
        }
    }

    /// From now on every command scans only these PVs.
    pub fn scope_to(&self, pvs: Vec<String>) {
        if !pvs.is_empty() {
            *self.devices.write().unwrap_or_else(|p| p.into_inner()) = pvs;
        }
    }

    pub fn devices(&self) -> Vec<String> {
        self.devices
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn device_mapper(&self) -> bool {
        !self.no_device_mapper
    }

    /// Start a command line for one of lvm2's tools.
    pub fn cmd(&self, tool: &'static str) -> LvmCmd {
        let mut args: Vec<OsString> = Vec::new();
        if self.no_device_mapper {
            args.extend(["--driverloaded".into(), "n".into()]);
        }
        if let Some(config) = &self.config {
            args.push(format!("--config={config}").into());
        }
        for pv in self.devices() {
            args.extend(["--devices".into(), pv.into()]);
        }
        LvmCmd {
            tool,
            args,
            timeout: self.timeout.unwrap_or_else(crate::node::cmd::timeout),
        }
    }

    /// Run a command that changes the system (never killed, see [`LvmCmd::run`]),
    /// then count it as a step.
    pub fn change(&self, cmd: LvmCmd) -> Result<Output> {
        let output = cmd.run()?;
        self.step();
        Ok(output)
    }

    /// A mutating step finished (an lvm2 change, or a data write). Tests can
    /// make the process die right here to prove the next start recovers.
    pub fn step(&self) {
        let done = self.steps.fetch_add(1, Ordering::SeqCst) + 1;
        if self.abort_after == Some(done) {
            tracing::error!(step = done, "aborting on request (crash injection)");
            std::process::abort();
        }
        crate::faults::step("lvm2 change or data write done");
    }

    /// Logical volumes of these VGs (one row per LV).
    pub fn lvs(&self, vgs: &[String]) -> Result<Vec<LvRow>> {
        let report: Vec<LvReport> = self
            .cmd("lvs")
            .report()
            .arg("-o")
            .arg(LV_FIELDS)
            .args(vgs)
            .json()?;
        Ok(report.into_iter().flat_map(|r| r.lv).collect())
    }

    /// Every segment of every LV of these VGs, with its LV's fields; with
    /// `name`, only that LV's (any of the VGs).
    pub fn lv_segments(&self, vgs: &[String], name: Option<&str>) -> Result<Vec<LvSegRow>> {
        let mut cmd = self
            .cmd("lvs")
            .report()
            .arg("--segments")
            .arg("-o")
            .arg(format!("{LV_FIELDS},{SEG_FIELDS}"));
        if let Some(name) = name {
            cmd = cmd.arg("-S").arg(format!("lv_name={name}"));
        }
        let report: Vec<LvSegReport> = cmd.args(vgs).json()?;
        Ok(report.into_iter().flat_map(|r| r.seg).collect())
    }

    /// The extent map of the PVs of these VGs: one row per used or free run.
    pub fn pv_segments(&self, vgs: &[String]) -> Result<Vec<PvSegRow>> {
        let selection = vgs
            .iter()
            .map(|vg| format!("vg_name={vg}"))
            .collect::<Vec<_>>()
            .join(" || ");
        let report: Vec<PvSegReport> = self
            .cmd("pvs")
            .report()
            .arg("--segments")
            .arg("-o")
            .arg(PVSEG_FIELDS)
            .arg("-S")
            .arg(selection)
            .json()?;
        Ok(report.into_iter().flat_map(|r| r.pvseg).collect())
    }

    pub fn vgs(&self, vgs: &[String]) -> Result<Vec<VgRow>> {
        let report: Vec<VgReport> = self
            .cmd("vgs")
            .report()
            .arg("-o")
            .arg(VG_FIELDS)
            .args(vgs)
            .json()?;
        Ok(report.into_iter().flat_map(|r| r.vg).collect())
    }
}

#[cfg(feature = "crash-injection")]
fn abort_after_step() -> Option<usize> {
    std::env::var(ABORT_AFTER_STEP_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
}

#[cfg(not(feature = "crash-injection"))]
fn abort_after_step() -> Option<usize> {
    None
}

const LV_FIELDS: &str =
    "lv_name,vg_name,lv_size,lv_tags,lv_attr,segtype,pool_lv,origin,lv_active,lv_path,data_percent,lv_health_status";
const SEG_FIELDS: &str = "stripes,seg_start_pe,seg_size_pe,seg_pe_ranges";
const VG_FIELDS: &str = "vg_name,vg_size,vg_free,vg_extent_size,pv_count,vg_mda_size,vg_mda_free";
const PVSEG_FIELDS: &str = "pv_name,vg_name,pe_start,pvseg_start,pvseg_size,lv_name";

/// One command line being built.
#[derive(Debug)]
pub struct LvmCmd {
    tool: &'static str,
    args: Vec<OsString>,
    timeout: Duration,
}

impl LvmCmd {
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Machine-readable report options.
    fn report(self) -> Self {
        self.args([
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "--noheadings",
        ])
    }

    pub fn display(&self) -> String {
        let mut line = self.tool.to_owned();
        for arg in &self.args {
            line.push(' ');
            line.push_str(&arg.to_string_lossy());
        }
        line
    }

    /// Run a command that may change metadata (anything but a report:
    /// lvcreate, lvremove, lvchange, lvextend, vgchange, pvcreate…). It is
    /// never killed: a kill between a device-mapper suspend and resume leaves
    /// the device suspended, and after one the outcome is unknown. Past its
    /// deadline it is logged and waited for.
    pub fn run(self) -> Result<Output> {
        self.execute(Effect::ChangesMetadata)
    }

    /// Run through the node's runner, timed by tool; lvm2's failures become
    /// domain errors.
    fn execute(self, effect: Effect) -> Result<Output> {
        let line = self.display();
        tracing::debug!(command = %line, ?effect, "lvm2");
        let started = Instant::now();
        let output = Tool::new(self.tool, effect)
            .args(&self.args)
            // lvm2 warns about every inherited descriptor; they are harmless.
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .deadline(self.timeout)
            .output();
        super::tool_metrics::observe(self.tool, started.elapsed().as_secs_f64());
        let output = output.map_err(|e| match e {
            // Name the whole command line, not just the tool.
            Error::DeadlineExceeded { after, stderr, .. } => Error::DeadlineExceeded {
                command: line.clone(),
                after,
                stderr,
            },
            other => other,
        })?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(classify(
                &line,
                &output.status.to_string(),
                &String::from_utf8_lossy(&output.stderr),
            ))
        }
    }

    /// Run a report (read-only, killed at its deadline) and decode
    /// `{"report": [T, ...]}`.
    fn json<T: DeserializeOwned>(self) -> Result<Vec<T>> {
        let line = self.display();
        let output = self.execute(Effect::ReadOnly)?;
        let doc: Report<T> = serde_json::from_slice(&output.stdout)
            .map_err(|e| Error::Internal(format!("cannot decode the report of `{line}`: {e}")))?;
        Ok(doc.report)
    }
}

/// Turn an lvm2 failure into the domain error its message describes,
/// keeping the message (minus lvm2's routine warnings).
pub fn classify(command: &str, status: &str, stderr: &str) -> Error {
    let message = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("WARNING: Activation disabled"))
        .collect::<Vec<_>>()
        .join("; ");
    let lower = message.to_ascii_lowercase();
    let has = |needle: &str| lower.contains(needle);
    if has("insufficient free space")
        || has("insufficient suitable")
        || has("not enough free space")
        || has("free space in thin pool")
    {
        Error::Exhausted(message)
    } else if has("exceeds maximum metadata size") {
        // Two creates that both passed the metadata check: the second finds the area full.
        Error::Exhausted(format!(
            "the volume group's metadata area is full ({message}); see the README's \"Volumes per volume group\""
        ))
    } else if has("already exists in volume group") {
        Error::AlreadyExists(message)
    } else if has("number of stripes") || has("stripe size") || has("invalid stripe") {
        Error::InvalidArgument(message)
    } else if has("volume group") && has("not found") {
        Error::Precondition(message)
    } else if has("failed to find logical volume") {
        Error::NotFound(message)
    } else if has("can't get lock") || has("failed to lock") || has("lock") && has("held") {
        Error::Busy(message)
    } else if has("device-mapper") || has("in use") || has("is open") || has("activation disabled")
    {
        Error::Precondition(message)
    } else {
        Error::Command {
            command: command.to_owned(),
            status: status.to_owned(),
            stderr: message,
        }
    }
}

#[derive(Deserialize)]
struct Report<T> {
    report: Vec<T>,
}

#[derive(Deserialize)]
struct LvReport {
    #[serde(default)]
    lv: Vec<LvRow>,
}

#[derive(Deserialize)]
struct LvSegReport {
    #[serde(default)]
    seg: Vec<LvSegRow>,
}

#[derive(Deserialize)]
struct PvSegReport {
    #[serde(default)]
    pvseg: Vec<PvSegRow>,
}

#[derive(Deserialize)]
struct VgReport {
    #[serde(default)]
    vg: Vec<VgRow>,
}

/// One LV as `lvs` reports it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LvRow {
    pub lv_name: String,
    pub vg_name: String,
    #[serde(deserialize_with = "number")]
    pub lv_size: u64,
    #[serde(deserialize_with = "comma_list")]
    pub lv_tags: Vec<String>,
    pub lv_attr: String,
    pub segtype: String,
    #[serde(default)]
    pub pool_lv: String,
    #[serde(default)]
    pub origin: String,
    #[serde(default)]
    pub lv_active: String,
    #[serde(default)]
    pub lv_path: String,
    /// Percent of a thin pool's data space in use ("" for other LVs).
    #[serde(default, deserialize_with = "optional_float")]
    pub data_percent: Option<f64>,
    #[serde(default)]
    pub lv_health_status: String,
}

impl LvRow {
    pub fn is_thin_pool(&self) -> bool {
        self.segtype == "thin-pool"
    }

    pub fn is_thin(&self) -> bool {
        self.segtype == "thin"
    }

    /// A copy-on-write snapshot (`lvcreate -s` of an LV that is not thin):
    /// `s` (or `S`, invalidated) first in its attributes.
    pub fn is_cow(&self) -> bool {
        matches!(self.lv_attr.chars().next(), Some('s' | 'S'))
            || (!self.origin.is_empty() && !self.is_thin())
    }
}

/// One segment of an LV, with its LV's fields (`lvs --segments`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LvSegRow {
    pub lv_name: String,
    pub vg_name: String,
    #[serde(deserialize_with = "number")]
    pub lv_size: u64,
    #[serde(deserialize_with = "comma_list")]
    pub lv_tags: Vec<String>,
    pub lv_attr: String,
    pub segtype: String,
    #[serde(default)]
    pub pool_lv: String,
    #[serde(default)]
    pub origin: String,
    #[serde(default)]
    pub lv_active: String,
    #[serde(default)]
    pub lv_path: String,
    #[serde(default, deserialize_with = "optional_float")]
    pub data_percent: Option<f64>,
    #[serde(default)]
    pub lv_health_status: String,
    #[serde(deserialize_with = "number")]
    pub stripes: u64,
    #[serde(deserialize_with = "number")]
    pub seg_start_pe: u64,
    #[serde(deserialize_with = "number")]
    pub seg_size_pe: u64,
    #[serde(default)]
    pub seg_pe_ranges: String,
}

impl LvSegRow {
    /// The LV part and the segment part.
    pub fn split(self) -> (LvRow, SegRow) {
        let seg = SegRow {
            segtype: self.segtype.clone(),
            stripes: self.stripes,
            seg_start_pe: self.seg_start_pe,
            seg_size_pe: self.seg_size_pe,
            seg_pe_ranges: self.seg_pe_ranges,
        };
        let lv = LvRow {
            lv_name: self.lv_name,
            vg_name: self.vg_name,
            lv_size: self.lv_size,
            lv_tags: self.lv_tags,
            lv_attr: self.lv_attr,
            segtype: self.segtype,
            pool_lv: self.pool_lv,
            origin: self.origin,
            lv_active: self.lv_active,
            lv_path: self.lv_path,
            data_percent: self.data_percent,
            lv_health_status: self.lv_health_status,
        };
        (lv, seg)
    }
}

/// One run of extents on a PV, used by an LV or free (`pvs --segments`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PvSegRow {
    pub pv_name: String,
    pub vg_name: String,
    #[serde(deserialize_with = "number")]
    pub pe_start: u64,
    #[serde(deserialize_with = "number")]
    pub pvseg_start: u64,
    #[serde(deserialize_with = "number")]
    pub pvseg_size: u64,
    /// Empty for free extents.
    #[serde(default)]
    pub lv_name: String,
}

/// One segment of an LV.
#[derive(Debug, Clone, PartialEq)]
pub struct SegRow {
    pub segtype: String,
    pub stripes: u64,
    pub seg_start_pe: u64,
    pub seg_size_pe: u64,
    pub seg_pe_ranges: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VgRow {
    pub vg_name: String,
    #[serde(deserialize_with = "number")]
    pub vg_size: u64,
    #[serde(deserialize_with = "number")]
    pub vg_free: u64,
    #[serde(deserialize_with = "number")]
    pub vg_extent_size: u64,
    #[serde(deserialize_with = "number")]
    pub pv_count: u64,
    /// Its smallest metadata area, and the room left there (see `metadata`).
    #[serde(default, deserialize_with = "number")]
    pub vg_mda_size: u64,
    #[serde(default, deserialize_with = "number")]
    pub vg_mda_free: u64,
}

fn number<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    let raw = String::deserialize(d)?;
    raw.trim().parse().map_err(serde::de::Error::custom)
}

fn optional_float<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<f64>, D::Error> {
    let raw = String::deserialize(d)?;
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(None);
    }
    raw.parse().map(Some).map_err(serde::de::Error::custom)
}

fn comma_list<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    let raw = String::deserialize(d)?;
    Ok(raw
        .split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect())
}

#[cfg(test)]
mod tests;
