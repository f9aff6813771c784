//! How prism finds nvcc and its static CUDA runtime. Shared by prism-cuda-sys's
//! and prism-bench's `build.rs` and by `xtask` (included by path), so the
//! builds and the tools agree on which compiler is used.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Environment variables this lookup reads, in order of precedence (then `PATH`).
#[allow(dead_code)]
pub const NVCC_ENV_VARS: &[&str] = &["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH"];

/// Where `cargo xtask install-nvcc` puts NVIDIA's PyPI compiler, relative to the workspace.
pub const LOCAL_CUDA_DIR: &str = ".cuda";

/// Finds nvcc: `$NVCC`, `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, the
/// workspace's `.cuda` venv (made by `cargo xtask install-nvcc`), then `PATH`.
/// `var` reads an environment variable (so build scripts can announce each read).
pub fn find_nvcc(workspace: &Path, var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    if let Some(nvcc) = var("NVCC") {
        return Some(PathBuf::from(nvcc));
    }
    for name in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = var(name) {
            let nvcc = Path::new(&home).join("bin/nvcc");
            if nvcc.is_file() {
                return Some(nvcc);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(workspace.join(LOCAL_CUDA_DIR).join("lib")) {
        for entry in entries.flatten() {
            let nvcc = entry.path().join("site-packages/nvidia/cu13/bin/nvcc");
            if nvcc.is_file() {
                return Some(nvcc);
            }
        }
    }
    let path = var("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("nvcc"))
        .find(|nvcc| nvcc.is_file())
}

/// The folders beside `nvcc` that hold `libcudart_static.a`, for
/// `cargo:rustc-link-search` (cc does not find it by itself): the PyPI
/// layout keeps it in `bin/../lib`, a toolkit install in `lib64`.
#[allow(dead_code)]
pub fn cudart_static_dirs(nvcc: &Path) -> Vec<PathBuf> {
    let Some(root) = nvcc.parent().and_then(Path::parent) else {
        return Vec::new();
    };
    ["lib", "lib64", "targets/x86_64-linux/lib"]
        .iter()
        .map(|lib| root.join(lib))
        .filter(|dir| dir.join("libcudart_static.a").is_file())
        .collect()
}
