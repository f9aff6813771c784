//! Compiles the benchmark's CUDA C++ baselines (`cuda/baselines.cu`, and
//! `cuda/s10.cu`: S10's kernels, launchers and baseline) with
//! nvcc, or, where prism-cuda-sys compiled no launchers (no nvcc, or its
//! `ptx-only` feature), a stub that returns `PRISM_ERR_KERNELS_NOT_BUILT`.
//! The baselines call prism-cuda-sys's `prism_fma_chain_f32` launcher and
//! include its header (`DEP_PRISM_KERNELS_INCLUDE`).

use std::env;
use std::path::{Path, PathBuf};

#[path = "../prism-cuda-sys/find_nvcc.rs"]
mod find_nvcc;

/// The GPUs the benchmark runs on: Ampere and Hopper machine code, and
/// compute_90 PTX for newer GPUs.
const GENCODE: &[&str] = &[
    "arch=compute_80,code=sm_80",
    "arch=compute_90,code=sm_90",
    "arch=compute_90,code=compute_90",
];

fn main() {
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH", "PRISM_NO_NVCC"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let cuda = manifest.join("cuda");
    println!("cargo:rerun-if-changed={}", cuda.display());
    let include = PathBuf::from(
        env::var("DEP_PRISM_KERNELS_INCLUDE").expect("prism-cuda-sys exports its include folder"),
    );
    let launchers = env::var("DEP_PRISM_KERNELS_KERNELS_BUILT").is_ok_and(|v| v == "1");
    let nvcc = launchers
        .then(|| find_nvcc::find_nvcc(&manifest.join("../.."), |v| env::var_os(v)))
        .flatten();
    match nvcc {
        Some(nvcc) => build_baselines(&nvcc, &cuda, &include),
        None => {
            cc::Build::new()
                .file(cuda.join("baselines_stub.c"))
                .include(&cuda)
                .include(&include)
                .warnings_into_errors(true)
                .compile("prism_baselines");
        }
    }
}

fn build_baselines(nvcc: &Path, cuda: &Path, include: &Path) {
    let mut build = cc::Build::new();
    build
        .cuda(true)
        .cudart("static")
        .compiler(nvcc)
        .no_default_flags(true)
        .debug(false)
        .warnings(false)
        .extra_warnings(false)
        .include(cuda)
        .include(include)
        .flag("-std=c++17")
        .flag("-O3")
        .flag("-Xcompiler=-fPIC,-Wall,-Wextra")
        .flag("-Werror=all-warnings");
    for gencode in GENCODE {
        build.flag(format!("-gencode={gencode}"));
    }
    build
        .file(cuda.join("baselines.cu"))
        .file(cuda.join("s10.cu"))
        .compile("prism_baselines");
    for dir in find_nvcc::cudart_static_dirs(nvcc) {
        println!("cargo:rustc-link-search=native={}", dir.display());
    }
}
