//! Finding and loading libnvcomp at run time: nothing links against it, so
//! every build and every test runs without it; [`Nvcomp::load`] says where
//! it looked when it is absent.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::sys;
use crate::{Error, Result};

/// The file name of nvCOMP 6's library (the ABI the bindings are of).
pub const LIBRARY_NAME: &str = "libnvcomp.so.6";
/// The environment variable naming the library (a file, or a folder holding it).
pub const LIBRARY_VAR: &str = "PRISM_NVCOMP_LIB";

/// A loaded libnvcomp (cheap to clone). The library is never unloaded
/// once loaded (its kernels may outlive every handle).
#[derive(Clone)]
pub struct Nvcomp {
    lib: Arc<sys::NvcompLib>,
    path: PathBuf,
    version: u32,
}

impl std::fmt::Debug for Nvcomp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nvcomp")
            .field("path", &self.path)
            .field("version", &self.version_string())
            .finish()
    }
}

/// Where [`Nvcomp::load`] looks, in order: `$PRISM_NVCOMP_LIB`, the
/// workspace's `.nvcomp/lib` (from `cargo xtask fetch-nvcomp`), the system
/// loader's search path, and Python's `site-packages/nvidia/libnvcomp/lib64`
/// (from `pip install nvidia-libnvcomp-cu13`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Candidate {
    /// A file path.
    File(PathBuf),
    /// A bare name for the system loader (`dlopen` searches `LD_LIBRARY_PATH`, the cache, ...).
    System(&'static str),
}

impl std::fmt::Display for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Candidate::File(p) => write!(f, "{}", p.display()),
            Candidate::System(n) => write!(f, "{n} (system loader)"),
        }
    }
}

/// The places searched, in order (see [`Candidate`]); files that do not
/// exist are listed too, so an error can say where it looked.
pub fn candidates() -> Vec<Candidate> {
    let mut out = Vec::new();
    if let Some(v) = std::env::var_os(LIBRARY_VAR) {
        let p = PathBuf::from(v);
        out.push(Candidate::File(if p.is_dir() {
            p.join(LIBRARY_NAME)
        } else {
            p
        }));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    out.push(Candidate::File(
        workspace.join(".nvcomp/lib").join(LIBRARY_NAME),
    ));
    out.push(Candidate::System(LIBRARY_NAME));
    for site in site_packages() {
        out.push(Candidate::File(
            site.join("nvidia/libnvcomp/lib64").join(LIBRARY_NAME),
        ));
    }
    out
}

/// Python package folders that may hold the wheel: `PYTHONPATH`, an active
/// virtual or conda environment, the user's and the system's.
fn site_packages() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(pp) = std::env::var_os("PYTHONPATH") {
        roots.extend(std::env::split_paths(&pp));
    }
    let mut lib_dirs = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(v) = std::env::var_os(var) {
            lib_dirs.push(PathBuf::from(v).join("lib"));
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        lib_dirs.push(PathBuf::from(home).join(".local/lib"));
    }
    lib_dirs.push(PathBuf::from("/usr/local/lib"));
    lib_dirs.push(PathBuf::from("/usr/lib"));
    for dir in lib_dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("python3"))
            })
            .flat_map(|p| [p.join("site-packages"), p.join("dist-packages")])
            .collect();
        found.sort();
        roots.extend(found);
    }
    roots.push(PathBuf::from("/usr/lib/python3/dist-packages"));
    roots
}

impl Nvcomp {
    /// Loads libnvcomp from the first place of [`candidates`] that holds a
    /// usable one. `$PRISM_NVCOMP_LIB`, when set, must be usable (no
    /// fallback past a library the user named).
    pub fn load() -> Result<Self> {
        let _span = tracing::debug_span!("prism.nvcomp.load").entered();
        let mut looked = Vec::new();
        let named = std::env::var_os(LIBRARY_VAR).is_some();
        for (i, c) in candidates().into_iter().enumerate() {
            let result = match &c {
                Candidate::File(p) if !p.is_file() => {
                    if named && i == 0 {
                        return Err(Error::LibraryUnusable {
                            path: p.clone(),
                            reason: format!("{LIBRARY_VAR} names no such file"),
                        });
                    }
                    looked.push(c.to_string());
                    continue;
                }
                Candidate::File(p) => Self::load_from(p),
                Candidate::System(name) => match Self::open(Path::new(name)) {
                    Err(Error::LibraryUnusable { reason, .. })
                        if reason.contains("cannot open shared object file") =>
                    {
                        looked.push(c.to_string());
                        continue;
                    }
                    other => other,
                },
            };
            match result {
                Ok(nv) => {
                    tracing::debug!(path = %nv.path.display(), "libnvcomp loaded");
                    return Ok(nv);
                }
                Err(e) if named && i == 0 => return Err(e),
                Err(e) => {
                    tracing::warn!("skipping {c}: {e}");
                    looked.push(format!("{c} ({e})"));
                }
            }
        }
        Err(Error::LibraryNotFound {
            looked: looked.join(", "),
        })
    }

    /// Loads the library at `path`.
    pub fn load_from(path: &Path) -> Result<Self> {
        Self::open(path)
    }

    fn open(path: &Path) -> Result<Self> {
        let unusable = |reason: String| Error::LibraryUnusable {
            path: path.to_path_buf(),
            reason,
        };
        // SAFETY: loading a shared library runs its initialisers; we load
        // only files named as nvCOMP 6's library (or a path the user chose
        // through PRISM_NVCOMP_LIB). The symbols are resolved with the
        // types of nvCOMP 6's headers; `dynamic_link_require_all` makes a
        // library lacking any of them an error here, and the major version
        // is checked below before any other function is called.
        let lib = unsafe { sys::NvcompLib::new(path) }.map_err(|e| unusable(e.to_string()))?;
        let mut props = sys::nvcompProperties_t::default();
        // SAFETY: nvcompGetProperties writes one nvcompProperties_t through
        // the pointer, which points at a live, writable value.
        let status = unsafe { lib.nvcompGetProperties(&mut props) };
        if status != sys::nvcompSuccess {
            return Err(unusable(format!("nvcompGetProperties returned {status}")));
        }
        // nvCOMP encodes its version as major * 1000 + minor * 100 + patch.
        if props.version / 1000 != sys::NVCOMP_VER_MAJOR {
            return Err(unusable(format!(
                "version {} (the bindings are of {}.x)",
                version_string(props.version),
                sys::NVCOMP_VER_MAJOR
            )));
        }
        Ok(Self {
            lib: {
                let lib = Arc::new(lib);
                // Never unloaded: nvCOMP's kernels may still be queued or
                // running when the last handle drops (a `Pending` holds
                // none), and unloading its bundled CUDA runtime would
                // unregister their modules under them.
                std::mem::forget(Arc::clone(&lib));
                lib
            },
            path: path.to_path_buf(),
            version: props.version,
        })
    }

    /// Where it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// nvCOMP's version as reported by the library (major*1000 + minor*100 + patch).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// "major.minor.patch".
    pub fn version_string(&self) -> String {
        version_string(self.version)
    }

    pub(crate) fn lib(&self) -> &sys::NvcompLib {
        &self.lib
    }
}

fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 1000, (v / 100) % 10, v % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_name_every_kind_of_place() {
        let c = candidates();
        assert!(c.contains(&Candidate::System(LIBRARY_NAME)));
        assert!(c
            .iter()
            .any(|c| matches!(c, Candidate::File(p) if p.ends_with(".nvcomp/lib/libnvcomp.so.6"))));
        assert!(c.iter().any(|c| matches!(c, Candidate::File(p) if p.ends_with("nvidia/libnvcomp/lib64/libnvcomp.so.6"))));
    }

    #[test]
    fn a_file_that_is_not_a_library_is_a_typed_error() {
        let dir = std::env::temp_dir().join(format!("prism-nvcomp-notlib-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join(LIBRARY_NAME);
        std::fs::write(&fake, b"not an ELF file").unwrap();
        let e = Nvcomp::load_from(&fake).unwrap_err();
        assert!(
            matches!(e, Error::LibraryUnusable { ref path, .. } if path == &fake),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
