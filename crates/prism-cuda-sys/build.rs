//! Compiles `kernels/prism_kernels.cu` with nvcc through `cc`, or, without
//! nvcc (or with the `ptx-only` feature), a C stub whose launchers all return
//! `PRISM_ERR_KERNELS_NOT_BUILT`; prism-stream then launches the same kernels
//! from the committed `kernels/prism_kernels.ptx` through the driver API.
//!
//! `kernels/` is the crate's own folder (in the workspace, a link to the
//! top-level `kernels/`; `cargo package` copies the files).
//!
//! nvcc is looked up in this order: `$NVCC`, `$CUDA_HOME/bin/nvcc`,
//! `$CUDA_PATH/bin/nvcc`, the workspace's `.cuda` folder made by
//! `cargo xtask install-nvcc`, then `PATH`. `PRISM_CUDA_ARCH` overrides the
//! targets (comma-separated nvcc `-gencode` values or `sm_XX` names).
//! `PRISM_NO_NVCC=1` forces the stub build.

use std::env;
use std::path::{Path, PathBuf};

// Shared with xtask, so both find the same compiler.
mod find_nvcc;
use find_nvcc::find_nvcc;

/// Default targets: machine code for Turing (sm_75: T4), Ampere (sm_80: A100,
/// sm_86: A10/RTX 30), Ada (sm_89: L4/L40/RTX 40) and Hopper (sm_90: H100/H200),
/// plus compute_90 PTX that the driver compiles for newer GPUs.
const DEFAULT_GENCODE: &[&str] = &[
    "arch=compute_75,code=sm_75",
    "arch=compute_80,code=sm_80",
    "arch=compute_86,code=sm_86",
    "arch=compute_89,code=sm_89",
    "arch=compute_90,code=sm_90",
    "arch=compute_90,code=compute_90",
];

fn main() {
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "PRISM_CUDA_ARCH",
        "PRISM_NO_NVCC",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    // Only used to find the workspace's `.cuda` (cargo xtask install-nvcc).
    let workspace = manifest.join("../..");
    let kernels = manifest.join("kernels");
    println!("cargo:rerun-if-changed={}", kernels.display());
    println!("cargo:rustc-check-cfg=cfg(prism_kernels)");
    // For dependents with their own CUDA code (prism-bench): DEP_PRISM_KERNELS_INCLUDE.
    println!("cargo:include={}", kernels.display());

    #[cfg(feature = "bindgen")]
    generate_bindings(&kernels);

    let ptx_only = env::var_os("CARGO_FEATURE_PTX_ONLY").is_some();
    let nvcc = if ptx_only || env::var_os("PRISM_NO_NVCC").is_some_and(|v| v == "1") {
        None
    } else {
        find_nvcc(&workspace, |var| env::var_os(var))
    };
    // Host helpers: plain C, in every build.
    cc::Build::new()
        .file(kernels.join("host_copy.c"))
        .include(&kernels)
        .opt_level(3)
        .warnings_into_errors(true)
        .compile("prism_host");
    match nvcc {
        Some(nvcc) => {
            build_cuda(&nvcc, &kernels);
            println!("cargo:kernels_built=1");
        }
        None => {
            if !ptx_only {
                println!(
                    "cargo:warning=prism-cuda-sys: nvcc not found, so the kernel launchers were not \
                     compiled; prism will load its kernels from the bundled PTX through the CUDA \
                     driver instead. For the nvcc launchers get nvcc with `cargo xtask install-nvcc` \
                     (CUDA 13.0 from PyPI, into ./.cuda), or set NVCC / CUDA_HOME, then rebuild."
                );
            }
            cc::Build::new()
                .file(kernels.join("stub.c"))
                .include(&kernels)
                .warnings_into_errors(true)
                .compile("prism_kernels");
            println!("cargo:kernels_built=0");
        }
    }
}

fn gencodes() -> Vec<String> {
    match env::var("PRISM_CUDA_ARCH") {
        Ok(spec) if !spec.trim().is_empty() => spec
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| match s.strip_prefix("sm_") {
                Some(num) => format!("arch=compute_{num},code=sm_{num}"),
                None => s.to_owned(),
            })
            .collect(),
        _ => DEFAULT_GENCODE.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn build_cuda(nvcc: &Path, kernels: &Path) {
    let mut build = cc::Build::new();
    build
        .cuda(true)
        .cudart("static")
        .compiler(nvcc)
        // cc's defaults would pass host-compiler flags straight to nvcc and, in
        // debug builds, `-G` (device debug code, many times slower kernels).
        .no_default_flags(true)
        .debug(false)
        .warnings(false)
        .extra_warnings(false)
        .include(kernels)
        .flag("-std=c++17")
        .flag("-O3")
        .flag("-Xcompiler=-fPIC,-Wall,-Wextra")
        .flag("-Werror=all-warnings");
    for gencode in gencodes() {
        build.flag(format!("-gencode={gencode}"));
    }
    build
        .file(kernels.join("prism_kernels.cu"))
        .compile("prism_kernels");

    for dir in find_nvcc::cudart_static_dirs(nvcc) {
        println!("cargo:rustc-link-search=native={}", dir.display());
    }
    println!("cargo:rustc-cfg=prism_kernels");
}

#[cfg(feature = "bindgen")]
fn generate_bindings(kernels: &Path) {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("bindings.rs");
    bindgen::Builder::default()
        .header(kernels.join("prism_kernels.h").to_string_lossy())
        .allowlist_function("prism_.*")
        .allowlist_var("PRISM_.*")
        .allowlist_type("prism_.*")
        .use_core()
        .layout_tests(false)
        .generate()
        .expect("bindgen could not parse kernels/prism_kernels.h (is libclang installed?)")
        .write_to_file(&out)
        .expect("write bindings to OUT_DIR");
}
