//! prism's developer tasks. `cargo xtask <command>`; one module per command.
//!
//! Few dependencies on purpose: std only, so `cargo xtask` builds fast in CI.

mod bindgen;
mod build_kernels;
mod gpu_test;
mod install_nvcc;
mod util;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  install-nvcc            install nvcc 13.0 from PyPI into ./.cuda (what CI uses)
  build-kernels [--check] compile kernels/*.cu to PTX and cubin under target/kernels/,
                          print ptxas' resource report, fail on spills or warnings;
                          --check also verifies committed generated files are fresh
  bindgen [--check]       regenerate crates/prism-cuda-sys/src/bindings.rs (needs libclang);
                          --check only verifies it matches kernels/prism_kernels.h
  gpu-test [--bundle DIR] run every GPU test on this machine's GPU (fails without one);
                          --bundle DIR builds them, stripped, into DIR with a run.sh
                          for a machine with a driver but no Rust
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprint!("{USAGE}");
        return ExitCode::FAILURE;
    };
    let result = match cmd.as_str() {
        "install-nvcc" => install_nvcc::run(rest),
        "build-kernels" => build_kernels::run(rest),
        "bindgen" => bindgen::run(rest),
        "gpu-test" => gpu_test::run(rest),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("xtask {cmd}: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
