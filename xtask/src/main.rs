//! prism's developer tasks. `cargo xtask <command>`; one module per command.
//!
//! Few dependencies on purpose: std and clap only, so `cargo xtask` builds
//! fast in CI.

mod bindgen;
mod build_kernels;
mod gpu_test;
mod install_nvcc;
mod util;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// prism's developer tasks.
#[derive(Debug, Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    version,
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install nvcc 13.0 from PyPI into ./.cuda (what CI uses)
    InstallNvcc,
    /// Compile kernels/*.cu to PTX and cubin under target/kernels/, print
    /// ptxas' resource report, fail on spills or warnings
    BuildKernels {
        /// Also verify that the committed generated files are fresh
        #[arg(long)]
        check: bool,
    },
    /// Regenerate crates/prism-cuda-sys/src/bindings.rs (needs libclang)
    Bindgen {
        /// Only verify that it matches kernels/prism_kernels.h (no libclang)
        #[arg(long)]
        check: bool,
    },
    /// Run the GPU bundle's steps on this machine's GPU: GPU tests,
    /// examples, benchmark, then compute-sanitizer when present (builds the
    /// bundle into target/gpu-test and runs its run.sh; fails without a GPU
    /// or nvcc)
    GpuTest {
        /// Build them, stripped, into DIR with a run.sh for a machine with a
        /// driver but no Rust
        #[arg(long, value_name = "DIR")]
        bundle: Option<PathBuf>,
    },
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::InstallNvcc => "install-nvcc",
            Command::BuildKernels { .. } => "build-kernels",
            Command::Bindgen { .. } => "bindgen",
            Command::GpuTest { .. } => "gpu-test",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::InstallNvcc => install_nvcc::run(),
        Command::BuildKernels { check } => build_kernels::run(*check),
        Command::Bindgen { check } => bindgen::run(*check),
        Command::GpuTest { bundle } => gpu_test::run(bundle.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("xtask {}: error: {msg}", cli.command.name());
            ExitCode::FAILURE
        }
    }
}
