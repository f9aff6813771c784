//! Compiles prism's NVTX shim (`nvtx/prism_nvtx.c` over the vendored,
//! header-only NVTX3 in `third_party/nvtx`) with the system's C compiler. It
//! needs no CUDA toolkit and no GPU: NVTX3 loads a tool (Nsight Systems)
//! at run time, through `NVTX_INJECTION64_PATH`, or does nothing.

fn main() {
    println!("cargo:rerun-if-changed=nvtx/prism_nvtx.c");
    println!("cargo:rerun-if-changed=third_party/nvtx");
    cc::Build::new()
        .file("nvtx/prism_nvtx.c")
        .include("third_party/nvtx")
        .opt_level(2)
        .compile("prism_nvtx");
    // NVTX3 finds the tool with dlopen/dlsym (in libc from glibc 2.34 on;
    // libdl before).
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" {
        println!("cargo:rustc-link-lib=dl");
    }
}
