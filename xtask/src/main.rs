//! prism's developer tasks. `cargo xtask <command>`; one module per command
//! (the `soak` command, which only runs the soak example, lives here).
//!
//! Few dependencies on purpose: std, clap, and serde/serde_json for
//! `bench-doc`, so `cargo xtask` builds fast in CI.

mod bench_doc;
mod bindgen;
mod build_kernels;
mod gpu_test;
mod install_nvcc;
mod modules;
mod nvcomp;
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
    /// Install nvcc 13.0 and CUDA 12.0's ptxas from PyPI into ./.cuda (what CI uses)
    InstallNvcc,
    /// Make the committed PTX (kernels/prism_kernels.ptx, the example's
    /// scale_add.ptx), compile every kernel source to PTX and cubin under
    /// target/kernels/, print ptxas' resource report, fail on spills or
    /// warnings
    BuildKernels {
        /// Write nothing: fail when a committed file (PTX, bindings, stubs)
        /// is stale or CUDA 12.0's ptxas rejects the committed PTX
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
        /// Build for CUDA 12 drivers: the `cuda-12` features (CUDA 12.0
        /// driver bindings, kernels from the bundled PTX), without prism-bench
        #[arg(long)]
        cuda_12: bool,
    },
    /// The imports between each library crate's top-level modules and
    /// their cycles; with --check, fail on a cycle xtask/module-cycles.txt
    /// does not allow
    Modules {
        /// Fail on a cycle the allowlist does not hold (CI)
        #[arg(long)]
        check: bool,
    },
    /// Write docs/BENCHMARKS.md from the benchmark's results (every
    /// results JSON under docs/bench): per workload, the newest figure on
    /// each card, with its driver, date and file
    BenchDoc {
        /// Read the results from DIR instead of docs/bench
        #[arg(long, value_name = "DIR")]
        from: Option<PathBuf>,
        /// Write nothing: fail when docs/BENCHMARKS.md is not what would
        /// be written (CI)
        #[arg(long)]
        check: bool,
    },
    /// Download nvCOMP (PyPI nvidia-libnvcomp-cu13, pinned) and unpack its
    /// headers and libnvcomp.so.6 into ./.nvcomp (where prism-nvcomp looks)
    FetchNvcomp,
    /// Regenerate crates/prism-nvcomp/src/sys.rs from ./.nvcomp/include
    /// (needs libclang; run fetch-nvcomp first)
    NvcompBindings {
        /// Only verify that it matches the headers in ./.nvcomp/include (no libclang)
        #[arg(long)]
        check: bool,
    },
    /// Soak prism: mixed iterations (pipeline runs in every input mode,
    /// coordinator op chains, triple-buffer steps) with the process's
    /// resources sampled into DIR/soak.csv and soak.png; fails if any rises
    /// more than 1 % after the warm-up (the GPU if there is one, else the
    /// host backend)
    Soak {
        /// Iterations
        #[arg(long, default_value_t = 100_000)]
        iterations: u64,
        /// Where soak.csv and soak.png go
        #[arg(long, value_name = "DIR", default_value = "target/soak")]
        out: PathBuf,
    },
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::InstallNvcc => "install-nvcc",
            Command::BuildKernels { .. } => "build-kernels",
            Command::Bindgen { .. } => "bindgen",
            Command::GpuTest { .. } => "gpu-test",
            Command::Modules { .. } => "modules",
            Command::BenchDoc { .. } => "bench-doc",
            Command::FetchNvcomp => "fetch-nvcomp",
            Command::NvcompBindings { .. } => "nvcomp-bindings",
            Command::Soak { .. } => "soak",
        }
    }
}

/// Runs prism-pipeline's `soak` example (release build).
fn soak(iterations: u64, out: &std::path::Path) -> util::Result {
    let iterations = iterations.to_string();
    let out = out.to_string_lossy().into_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(util::root());
    util::run(cmd.args([
        "run",
        "--release",
        "-p",
        "prism-pipeline",
        "--example",
        "soak",
        "--",
        "--iterations",
        &iterations,
        "--out",
        &out,
    ]))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::InstallNvcc => install_nvcc::run(),
        Command::BuildKernels { check } => build_kernels::run(*check),
        Command::Bindgen { check } => bindgen::run(*check),
        Command::GpuTest { bundle, cuda_12 } => gpu_test::run(bundle.as_deref(), *cuda_12),
        Command::Modules { check } => modules::run(*check),
        Command::BenchDoc { from, check } => bench_doc::run(from.as_deref(), *check),
        Command::FetchNvcomp => nvcomp::fetch(),
        Command::NvcompBindings { check } => nvcomp::bindings(*check),
        Command::Soak { iterations, out } => soak(*iterations, out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("xtask {}: error: {msg}", cli.command.name());
            ExitCode::FAILURE
        }
    }
}
