//! `cargo xtask install-nvcc`: NVIDIA's CUDA 13.0 compiler from PyPI into
//! `./.cuda`, and CUDA 12.0's ptxas beside it.
//!
//! The pins match the GPU machine's driver (PTX ISA up to 9.0): nvcc and nvvm
//! must be pinned together, or cicc emits PTX newer than ptxas accepts.
//! CUDA 12.0's ptxas (PyPI has no CUDA 12 nvcc, only its ptxas) checks that
//! the committed PTX needs nothing newer than CUDA 12.0 drivers have
//! (`cargo xtask build-kernels --check`).

use std::process::Command;

use crate::util::{self, Result};

pub const PINS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-crt==13.0.88",
    // ptxas only: site-packages/nvidia/cuda_nvcc/bin/ptxas.
    "nvidia-cuda-nvcc-cu12==12.0.140",
];

pub fn run() -> Result {
    let venv = util::root().join(util::LOCAL_CUDA_DIR);
    let python = venv.join("bin/python3");
    if !python.is_file() {
        util::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .map_err(|e| format!("{e}\n(python3 with the venv module is needed)"))?;
    }
    util::run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(PINS),
    )?;
    match util::find_nvcc() {
        Some(nvcc) if nvcc.starts_with(&venv) => {
            let (_, out, _) = util::output(Command::new(&nvcc).arg("--version"))?;
            let release = out.lines().find(|l| l.contains("release")).unwrap_or("?");
            eprintln!("nvcc installed: {} ({release})", nvcc.display());
            Ok(())
        }
        Some(other) => {
            eprintln!(
                "nvcc installed into {}, but the build will use {} (NVCC/CUDA_HOME/CUDA_PATH take precedence)",
                venv.display(),
                other.display()
            );
            Ok(())
        }
        None => Err(format!(
            "pip finished but no nvcc was found under {}",
            venv.display()
        )),
    }
}
