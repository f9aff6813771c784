//! Small helpers shared by the xtask commands.

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "../../crates/prism-cuda-sys/find_nvcc.rs"]
mod find_nvcc_impl;
pub use find_nvcc_impl::LOCAL_CUDA_DIR;

pub type Result<T = ()> = std::result::Result<T, String>;

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// nvcc as prism-cuda-sys's build script would find it.
pub fn find_nvcc() -> Option<PathBuf> {
    find_nvcc_impl::find_nvcc(&root(), |v| std::env::var_os(v))
}

/// Runs a command, echoing it, and fails with its exit status.
pub fn run(cmd: &mut Command) -> Result {
    eprintln!("$ {}", show(cmd));
    let status = cmd
        .status()
        .map_err(|e| format!("could not start `{}`: {e}", show(cmd)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed ({status})", show(cmd)))
    }
}

/// Runs a command and returns (success, stdout, stderr).
pub fn output(cmd: &mut Command) -> Result<(bool, String, String)> {
    let out = cmd
        .output()
        .map_err(|e| format!("could not start `{}`: {e}", show(cmd)))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// FNV-1a 64: a stable fingerprint for "is this generated file fresh" checks.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| format!("read {}: {e}", path.display()))
}

pub fn write(path: &Path, text: &str) -> Result {
    std::fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))
}
