//! Where and when a `results.json` was measured, beside the card's name and
//! the driver's CUDA version that the report always held: the kernel-mode
//! driver's version, the PCIe link of GPU 0, the UTC time the run started
//! and the commit prism-bench was built from. Each is `None` where this
//! machine does not say (and in results saved before they were recorded),
//! never a guess.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use prism_stream::cudarc::driver::sys::CUdevice_attribute;
use prism_stream::cudarc::driver::CudaContext;
use serde::{Deserialize, Serialize};

/// The fields of `results.json` that say where and when it was measured.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Provenance {
    /// Kernel-mode driver version, e.g. `580.159.04`
    /// (`/proc/driver/nvidia/version`, else `nvidia-smi`).
    #[serde(default)]
    pub(crate) driver_version: Option<String>,
    /// GPU 0's PCIe link as the host's PCI tree reports it after the run,
    /// e.g. `Gen5 x16` (current and maximum, when they differ: an idle link
    /// may train down).
    #[serde(default)]
    pub(crate) pcie_link: Option<String>,
    /// When the run started, UTC, RFC 3339 (`2026-12-07T16:21:05Z`).
    #[serde(default)]
    pub(crate) date_utc: Option<String>,
    /// The commit measured: `PRISM_COMMIT` at run time (the GPU bundle's
    /// run.sh sets it from the `COMMIT` file `cargo xtask gpu-test
    /// --bundle` writes, `-dirty` with uncommitted changes); absent if unset.
    #[serde(default)]
    pub(crate) git_commit: Option<String>,
}

impl Provenance {
    /// The time now and the build's commit; the driver and the link are
    /// read by [`Provenance::read_device`] once a GPU is open.
    pub(crate) fn start() -> Self {
        let commit = std::env::var("PRISM_COMMIT")
            .ok()
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty());
        Provenance {
            date_utc: Some(rfc3339_utc(SystemTime::now())),
            git_commit: commit,
            ..Provenance::default()
        }
    }

    /// Reads the driver's version and GPU 0's PCIe link.
    pub(crate) fn read_device(&mut self, ctx: &CudaContext) {
        self.driver_version = driver_version();
        self.pcie_link = pcie_link(ctx);
    }

    /// One line for the printed tables.
    pub(crate) fn describe(&self) -> String {
        let or_unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| "?".into());
        format!(
            "driver {}, PCIe {}, run started {}, commit {}",
            or_unknown(&self.driver_version),
            or_unknown(&self.pcie_link),
            or_unknown(&self.date_utc),
            or_unknown(&self.git_commit)
        )
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a time after the Unix epoch.
pub(crate) fn rfc3339_utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // d is in 1..=31 and m in 1..=12 by construction.
    (y, m as u32, d as u32)
}

/// The kernel module's version from `/proc/driver/nvidia/version`, else
/// from `nvidia-smi`.
fn driver_version() -> Option<String> {
    std::fs::read_to_string("/proc/driver/nvidia/version")
        .ok()
        .and_then(|text| parse_proc_version(&text))
        .or_else(|| {
            nvidia_smi("driver_version")
                .filter(|v| v.chars().next().is_some_and(|c| c.is_ascii_digit()))
        })
}

/// The version in `NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  ...`
/// (or `... Open Kernel Module for x86_64  580.159.04  Release Build ...`).
fn parse_proc_version(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.starts_with("NVRM version:"))?;
    line.split_whitespace()
        .find(|w| {
            w.contains('.')
                && w.split('.').count() >= 2
                && w.split('.')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(str::to_owned)
}

/// GPU 0's link from sysfs (through its PCI address), else from `nvidia-smi`.
fn pcie_link(ctx: &CudaContext) -> Option<String> {
    let attr = |a| ctx.attribute(a).ok();
    let address = match (
        attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID),
        attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID),
        attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID),
    ) {
        (Some(dom), Some(bus), Some(dev)) => Some(format!("{dom:04x}:{bus:02x}:{dev:02x}.0")),
        _ => None,
    };
    address
        .and_then(|a| sysfs_link(&Path::new("/sys/bus/pci/devices").join(a)))
        .or_else(|| {
            let gen = nvidia_smi("pcie.link.gen.max")?;
            let width = nvidia_smi("pcie.link.width.max")?;
            let (gen, width) = (gen.parse::<u32>().ok()?, width.parse::<u32>().ok()?);
            Some(format!("Gen{gen} x{width}"))
        })
}

/// `Gen5 x16`, or `Gen1 x16 (max Gen5 x16)` when the link runs below its
/// maximum, from a PCI device's sysfs folder.
fn sysfs_link(dir: &Path) -> Option<String> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let max = link_text(&read("max_link_speed")?, &read("max_link_width")?)?;
    let current = read("current_link_speed")
        .zip(read("current_link_width"))
        .and_then(|(s, w)| link_text(&s, &w));
    Some(match current {
        Some(c) if c != max => format!("{c} (max {max})"),
        _ => max,
    })
}

/// `Gen5 x16` from sysfs's `32.0 GT/s PCIe` and `16`.
pub(crate) fn link_text(speed: &str, width: &str) -> Option<String> {
    let gts: f64 = speed.split_whitespace().next()?.parse().ok()?;
    let gen = [
        (2.5, 1),
        (5.0, 2),
        (8.0, 3),
        (16.0, 4),
        (32.0, 5),
        (64.0, 6),
    ]
    .iter()
    .find(|(g, _)| (gts - g).abs() < 0.01)
    .map(|&(_, n)| n)?;
    let width: u32 = width.trim().parse().ok()?;
    Some(format!("Gen{gen} x{width}"))
}

/// One `nvidia-smi --query-gpu` field of GPU 0, if the tool runs.
fn nvidia_smi(field: &str) -> Option<String> {
    let out = Command::new("nvidia-smi")
        .args([
            "-i",
            "0",
            &format!("--query-gpu={field}"),
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!v.is_empty() && !v.contains("N/A") && !v.contains('[')).then_some(v)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn utc_dates_are_the_calendar_ones() {
        let at = |s: u64| rfc3339_utc(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        // 2026-12-07 16:21:05 UTC.
        assert_eq!(at(1_796_660_465), "2026-12-07T16:21:05Z");
        assert_eq!(at(1_798_761_599), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn driver_version_from_proc() {
        let closed = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  Thu Oct 30 2025\nGCC version:  gcc 12\n";
        assert_eq!(parse_proc_version(closed).as_deref(), Some("580.159.04"));
        let open = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (dvs-builder@U16)  Thu Oct 30 2025\n";
        assert_eq!(parse_proc_version(open).as_deref(), Some("580.159.04"));
        assert_eq!(parse_proc_version("GCC version: 12.2\n"), None);
    }

    #[test]
    fn link_names_the_generation() {
        assert_eq!(
            link_text("32.0 GT/s PCIe\n", "16\n").as_deref(),
            Some("Gen5 x16")
        );
        assert_eq!(link_text("2.5 GT/s PCIe", "8").as_deref(), Some("Gen1 x8"));
        assert_eq!(link_text("Unknown", "16"), None);
    }

    #[test]
    fn old_results_have_no_provenance() {
        let p: Provenance = serde_json::from_str("{}").expect("empty object");
        assert_eq!(p, Provenance::default());
    }
}
