//! Normal builds do nothing here: the bindings are committed (`src/sys.rs`).
//! With the `bindgen` feature (`cargo xtask nvcomp-bindings`), bindgen reads
//! nvCOMP's C headers and writes `$OUT_DIR/sys.rs`, which the xtask copies
//! into `src/sys.rs`.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "bindgen")]
    generate();
}

/// The batched C API of every codec, loaded at run time (`NvcompLib`).
#[cfg(feature = "bindgen")]
fn generate() {
    use std::path::PathBuf;
    println!("cargo:rerun-if-env-changed=PRISM_NVCOMP_INCLUDE");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let include = std::env::var_os("PRISM_NVCOMP_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../../.nvcomp/include"));
    let header = include.join("nvcomp.h");
    if !header.is_file() {
        panic!(
            "prism-nvcomp (feature bindgen): no {}; run `cargo xtask fetch-nvcomp` or set PRISM_NVCOMP_INCLUDE",
            header.display()
        );
    }
    println!("cargo:rerun-if-changed={}", include.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("sys.rs");
    let bindings = bindgen::Builder::default()
        .header(header.to_string_lossy())
        .clang_arg(format!("-I{}", include.display()))
        // The CUDA runtime header is not needed: nvcomp.h declares
        // `cudaStream_t` itself when <cuda_runtime.h> is absent.
        .allowlist_function("nvcompGetProperties")
        .allowlist_function(
            "nvcompBatched(LZ4|Snappy|Zstd|Deflate|Gdeflate|Cascaded|Bitcomp|ANS)(Compress|Decompress)(GetRequiredAlignments|GetTempSize|GetMaxOutputChunkSize|Async)",
        )
        .allowlist_type("nvcomp.*")
        .allowlist_var("nvcomp.*(MaxAllowedChunkSize|RequiredCompressionAlignment|RequiredDecompressionAlignment)")
        .allowlist_var("NVCOMP_VER_.*")
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .dynamic_library_name("NvcompLib")
        .dynamic_link_require_all(true)
        .layout_tests(false)
        .derive_default(true)
        .generate()
        .expect("bindgen could not parse nvCOMP's headers (is libclang installed?)")
        .to_string();
    // bindgen writes the loader for libloading 0.8 (`AsRef<OsStr>` paths);
    // the workspace uses 0.9 (cudarc's), whose paths are `AsFilename`.
    let old = "P: AsRef<::std::ffi::OsStr>";
    assert!(
        bindings.contains(old),
        "bindgen's loader changed: update the libloading fix-up in build.rs"
    );
    let bindings = bindings.replace(old, "P: ::libloading::AsFilename");
    std::fs::write(&out, bindings).expect("write bindings to OUT_DIR");
}
