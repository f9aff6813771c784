//! GPUDirect Storage (cuFile) on this machine, as a fact to report beside
//! a file run: whether `libcufile` loads, whether its driver opens, and in
//! which mode. With the kernel module `nvidia-fs` cuFile reads from a
//! supported drive straight into GPU memory; without it, cuFile runs in
//! compatibility mode, through host memory, as prism's own file reads do
//! (`prism_pipeline::file`: `O_DIRECT` into pinned slots). prism does not
//! read through cuFile yet; this says what a run on this machine could use.
//!
//! Built with prism-stream's `cufile` feature (cudarc's cuFile bindings,
//! loaded at run time); without it [`gds_status`] says so.

/// What cuFile offers here ([`gds_status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GdsStatus {
    /// prism-stream was built without its `cufile` feature.
    NotBuilt,
    /// No CUDA driver, or no `libcufile.so` to load.
    NoLibrary { reason: &'static str },
    /// `cuFileDriverOpen` (or the properties query) failed.
    DriverOpenFailed { reason: String },
    /// The cuFile driver is open.
    Open {
        /// `nvidia-fs` version (major, minor): `None` when the kernel
        /// module is absent, so every read runs in compatibility mode.
        nvfs: Option<(u32, u32)>,
        /// File systems and drives the driver reports direct support for.
        supported: Vec<&'static str>,
        /// Largest direct transfer, bytes.
        max_direct_io_bytes: usize,
    },
}

impl GdsStatus {
    /// True when `nvidia-fs` is loaded: reads can bypass host memory. GDS
    /// 1.13 and later may also move data peer to peer without it, which
    /// this cannot tell.
    pub fn direct(&self) -> bool {
        matches!(self, GdsStatus::Open { nvfs: Some(_), .. })
    }
}

impl std::fmt::Display for GdsStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GdsStatus::NotBuilt => write!(f, "not built (prism-stream's `cufile` feature is off)"),
            GdsStatus::NoLibrary { reason } => write!(f, "unavailable: {reason}"),
            GdsStatus::DriverOpenFailed { reason } => {
                write!(f, "cuFileDriverOpen failed: {reason}")
            }
            GdsStatus::Open {
                nvfs: None,
                supported,
                max_direct_io_bytes,
            } => write!(
                f,
                "no nvidia-fs: compatibility mode (reads through host memory), unless this GDS moves data peer to peer without it{}; max I/O {} KiB",
                if supported.is_empty() {
                    String::new()
                } else {
                    format!(" (it lists {})", supported.join(", "))
                },
                max_direct_io_bytes >> 10
            ),
            GdsStatus::Open {
                nvfs: Some((major, minor)),
                supported,
                max_direct_io_bytes,
            } => write!(
                f,
                "direct (nvidia-fs {major}.{minor}; supports {}; max direct I/O {} KiB)",
                if supported.is_empty() {
                    "no file system listed".to_owned()
                } else {
                    supported.join(", ")
                },
                max_direct_io_bytes >> 10
            ),
        }
    }
}

/// The names of `CUfileDriverStatusFlags` bits, by bit.
#[cfg(feature = "cufile")]
const SUPPORT_BITS: [(u32, &str); 13] = [
    (0, "Lustre"),
    (1, "WekaFS"),
    (2, "NFS"),
    (3, "GPFS"),
    (4, "NVMe"),
    (5, "NVMe-oF"),
    (6, "SCSI"),
    (7, "ScaleFlux CSD"),
    (8, "NVMesh"),
    (9, "BeeGFS"),
    (11, "NVMe P2P"),
    (12, "ScateFS"),
    (13, "VirtioFS"),
];

/// Whether and how cuFile works here. Opens the cuFile driver for the
/// process (cuFile keeps it open until exit) where it is not yet open;
/// opening it creates contexts on the GPUs and may write `cufile.log` in
/// the working directory (cuFile's own logging, see `/etc/cufile.json`).
pub fn gds_status() -> GdsStatus {
    #[cfg(not(feature = "cufile"))]
    {
        GdsStatus::NotBuilt
    }
    #[cfg(feature = "cufile")]
    {
        use cudarc::cufile::{result, sys};
        if !crate::driver_available() {
            return GdsStatus::NoLibrary {
                reason: "no CUDA driver (libcuda.so)",
            };
        }
        // SAFETY: only tries to dlopen libcufile and reports success; it
        // calls no cuFile function (cudarc's loader panics on first use
        // when the library is missing: this checks first).
        if !unsafe { sys::is_culib_present() } {
            return GdsStatus::NoLibrary {
                reason: "no libcufile.so (install the CUDA toolkit's GDS package, or put it on LD_LIBRARY_PATH)",
            };
        }
        // cudarc looks each symbol up at its first call and panics when a
        // (partial or foreign) libcufile lacks it: that is "no library".
        let probe = std::panic::catch_unwind(|| {
            result::driver_open().map(|()| result::driver_get_properties())
        });
        let props = match probe {
            Err(_) => {
                return GdsStatus::NoLibrary {
                    reason: "libcufile.so lacks cuFileDriverOpen or cuFileDriverGetProperties",
                }
            }
            Ok(Err(e)) => {
                return GdsStatus::DriverOpenFailed {
                    reason: format!("{e:?}"),
                }
            }
            Ok(Ok(p)) => p,
        };
        match props {
            Err(e) => GdsStatus::DriverOpenFailed {
                reason: format!("cuFileDriverGetProperties: {e:?}"),
            },
            Ok(p) => {
                let flags = p.nvfs.dstatusflags;
                GdsStatus::Open {
                    nvfs: (p.nvfs.major_version != 0)
                        .then_some((p.nvfs.major_version, p.nvfs.minor_version)),
                    supported: SUPPORT_BITS
                        .iter()
                        .filter(|(bit, _)| flags & (1 << bit) != 0)
                        .map(|&(_, name)| name)
                        .collect(),
                    max_direct_io_bytes: p.nvfs.max_direct_io_size,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_reported_without_a_gpu_and_never_panics() {
        let s = gds_status();
        let text = s.to_string();
        assert!(!text.is_empty());
        if !crate::driver_available() {
            assert!(
                matches!(s, GdsStatus::NotBuilt | GdsStatus::NoLibrary { .. }),
                "{s:?}"
            );
            assert!(!s.direct());
        }
    }

    #[test]
    fn display_names_the_mode() {
        let compat = GdsStatus::Open {
            nvfs: None,
            supported: vec![],
            max_direct_io_bytes: 16 << 20,
        };
        assert!(compat
            .to_string()
            .starts_with("no nvidia-fs: compatibility mode"));
        assert!(!compat.direct());
        let direct = GdsStatus::Open {
            nvfs: Some((2, 17)),
            supported: vec!["NVMe"],
            max_direct_io_bytes: 16 << 20,
        };
        assert!(direct.direct());
        assert!(direct.to_string().contains("nvidia-fs 2.17; supports NVMe"));
    }
}
