//! `cargo xtask gpu-test [--bundle DIR]`.
//!
//! With `--bundle DIR`: builds every test binary that has GPU tests (named
//! `gpu_*`), the examples and `prism-bench` in the `bundle` profile
//! (release, stripped) and writes DIR with the binaries and `run.sh`, which
//! runs them on an x86_64 machine that has a driver but no Rust: the tests
//! with `PRISM_REQUIRE_GPU=1` (a GPU test's "skipped: no GPU" becomes a
//! failure), the examples and the benchmark, then the GPU tests and the
//! examples (small sizes) under compute-sanitizer (memcheck, racecheck,
//! synccheck, initcheck). It also compiles the NVTX injection counter
//! (`tests/nvtx/nvtx_count.c`) into `nvtx/`, and run.sh runs the README's
//! main job and the coordinator example with it and checks the ranges they
//! pushed ([`nvtx_steps`]).
//!
//! Without `--bundle`, on a machine with a GPU and Rust: the same steps,
//! here. It prints the GPU `nvidia-smi` finds (and fails at once without
//! one), builds the same bundle into `target/gpu-test/` (no size budget) and
//! runs its `run.sh`, so both paths run one script.
//!
//! Without nvcc (or with `PRISM_NO_NVCC=1`) the bundle's prism kernels load
//! from the bundled PTX through the driver; `--cuda-12` builds with the
//! `cuda-12` features (CUDA 12.0 driver bindings, PTX kernels, no
//! prism-bench). compute-sanitizer is looked for
//! on `PATH`, in `$CUDA_HOME/bin`, `$CUDA_PATH/bin` and
//! `/usr/local/cuda/bin`; without it the sanitizer pass is skipped
//! (`SANITIZE=0`) with a note. run.sh's variables (`SANITIZE`, `TOOLS`,
//! `EXAMPLES`, `ONLY`, `STEP_TIMEOUT`, `LOGS`, `OUT`) pass through.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{self, Result};

/// Examples and the arguments of their smoke run (package, example, args).
pub const EXAMPLE_SMOKE_RUNS: &[(&str, &str, &str)] = &[
    ("prism-stream", "smoke", ""),
    ("prism-stream", "coordinator", ""),
    ("prism-stream", "coordinator_overhead", ""),
    ("prism-buffer", "triple_buffer", ""),
    ("prism-pipeline", "multi_stage", ""),
    ("prism-pipeline", "custom_kernel", ""),
    ("prism-pipeline", "step_loop", ""),
    ("prism-pipeline", "stream_check", ""),
    // A cuBLAS stage (1 GiB, cold and warm run) and a cuFFT stage (256 MiB):
    // need the `cublas`/`cufft` features (BUNDLE_FEATURES) and the libraries.
    ("prism-pipeline", "gemm_stage", ""),
    ("prism-pipeline", "fft_stage", ""),
    ("prism-pipeline", "pagerank", ""),
    (
        "prism-pipeline",
        "streaming",
        "--trace \"$LOGS/streaming.trace.json\"",
    ),
    (
        "prism-pipeline",
        "streaming",
        "--pageable --mib 1024 --trace \"$LOGS/streaming-pageable.trace.json\"",
    ),
    ("prism-bench", "prism-bench", "--out \"$LOGS/bench\""),
];

/// Examples (and arguments) that also run under every compute-sanitizer
/// tool, at the small sizes `PRISM_TEST_SCALE=small` gives them.
pub const EXAMPLE_SANITIZER_RUNS: &[(&str, &str)] = &[
    ("smoke", ""),
    ("coordinator", ""),
    ("triple_buffer", ""),
    ("multi_stage", ""),
    ("custom_kernel", ""),
    ("step_loop", ""),
    ("stream_check", "--gib 0.004 --chunk-mib 1"),
    ("pagerank", "--vertices 4096"),
    ("streaming", "--mib 16 --chunk-mib 4"),
    ("streaming", "--pageable --mib 16 --chunk-mib 4"),
    ("gemm_stage", "--mib 16 --chunk-mib 4"),
    ("fft_stage", "--mib 16 --chunk-mib 4"),
];

/// Features the bundle builds with, beside the CUDA version's: the
/// examples that call cuBLAS and cuFFT from a stage (`gemm_stage`,
/// `fft_stage`) need them (`required-features`). Tests and examples are
/// built with the same features, so prism-stream is compiled once.
pub const BUNDLE_FEATURES: &str =
    "prism-pipeline/cublas,prism-pipeline/cufft,prism-pipeline/cufile";

/// The compute-sanitizer tools a GPU run uses.
pub const SANITIZER_TOOLS: &str = "memcheck racecheck synccheck initcheck";

/// Test-name fragment of GPU tests that queue work from several host
/// threads: under compute-sanitizer each runs in a process of its own, and
/// not under racecheck, which hung in one of them (twice in three runs on
/// an H200, alone once too; memcheck, synccheck and initcheck pass it).
pub const THREADS_TEST_MARK: &str = "_threads_";

/// Test-name fragment of tests that fault the GPU on purpose: they run alone,
/// never under compute-sanitizer (which would rightly report the fault).
pub const FAULT_TEST_MARK: &str = "fault_injection";

/// `cuda12`: build with the `cuda-12` features (CUDA 12.0 driver bindings,
/// kernels from the PTX) instead of the default.
pub fn run(bundle_dir: Option<&Path>, cuda12: bool) -> Result {
    match bundle_dir {
        None => run_here(cuda12),
        Some(dir) => bundle(dir, Some(BUNDLE_BUDGET), cuda12),
    }
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(util::root());
    cmd
}

/// Where `cargo xtask gpu-test` (without `--bundle`) builds and runs the
/// bundle, under the workspace root.
const LOCAL_BUNDLE: &str = "target/gpu-test";

/// The bundle's size budget: what a GPU machine without Rust is sent (the
/// gzipped archive of the bundle folder).
const BUNDLE_BUDGET: u64 = 60 * 1024 * 1024;

fn run_here(cuda12: bool) -> Result {
    let (ok, out, err) = util::output(Command::new("nvidia-smi").args([
        "--query-gpu=name,driver_version,memory.total",
        "--format=csv,noheader",
    ]))
    .unwrap_or((false, String::new(), "nvidia-smi not found".into()));
    if !ok || out.trim().is_empty() {
        return Err(format!(
            "no GPU found on this machine ({}). GPU tests need an NVIDIA GPU and driver; \
             on a machine without one, build a bundle with `cargo xtask gpu-test --bundle DIR` \
             and run DIR/run.sh where the GPU is.",
            err.trim()
        ));
    }
    eprintln!("GPU found: {}", out.trim());
    let dir = util::root().join(LOCAL_BUNDLE);
    bundle(&dir, None, cuda12)?;
    let mut script = Command::new("bash");
    script.arg(dir.join("run.sh"));
    match find_sanitizer() {
        Sanitizer::In(bin) => {
            // Found outside PATH: run.sh calls it by name.
            let path = std::env::var_os("PATH").unwrap_or_default();
            let dirs = std::iter::once(bin).chain(std::env::split_paths(&path));
            let joined = std::env::join_paths(dirs)
                .map_err(|e| format!("PATH with the sanitizer's folder: {e}"))?;
            script.env("PATH", joined);
        }
        Sanitizer::OnPath => {}
        Sanitizer::Missing if std::env::var_os("SANITIZE").is_none() => {
            eprintln!(
                "compute-sanitizer not found (PATH, $CUDA_HOME/bin, $CUDA_PATH/bin, \
                 /usr/local/cuda/bin): the sanitizer pass is skipped (SANITIZE=0)"
            );
            script.env("SANITIZE", "0");
        }
        Sanitizer::Missing => {}
    }
    let result = util::run(&mut script);
    eprintln!("logs: {}", dir.join("logs").display());
    result
}

/// Where compute-sanitizer is.
enum Sanitizer {
    OnPath,
    /// In this CUDA `bin` folder, outside `PATH`.
    In(PathBuf),
    Missing,
}

fn find_sanitizer() -> Sanitizer {
    let runs = |program: &Path| {
        Command::new(program)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if runs(Path::new("compute-sanitizer")) {
        return Sanitizer::OnPath;
    }
    ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| std::env::var_os(v).map(|d| PathBuf::from(d).join("bin")))
        .chain(std::iter::once(PathBuf::from("/usr/local/cuda/bin")))
        .find(|bin| runs(&bin.join("compute-sanitizer")))
        .map_or(Sanitizer::Missing, Sanitizer::In)
}

/// Executables cargo reports for a build, as (unique name, path).
fn built_executables(args: &[&str], tests_only: bool) -> Result<Vec<(String, PathBuf)>> {
    let (ok, stdout, stderr) = util::output(cargo().args(args).arg("--message-format=json"))?;
    if !ok {
        return Err(format!("cargo {} failed:\n{stderr}", args.join(" ")));
    }
    let mut found = Vec::new();
    for line in stdout
        .lines()
        .filter(|l| l.contains("\"compiler-artifact\""))
    {
        // `cargo test --no-run` also builds examples as plain binaries: keep test harnesses only.
        if tests_only && !line.contains("\"test\":true") {
            continue;
        }
        let Some(exe) = json_str(line, "\"executable\":\"") else {
            continue;
        };
        let package = json_str(line, "\"package_id\":\"")
            .map(|id| package_name(&id))
            .unwrap_or_default();
        let target = json_str(line, "\"name\":\"").unwrap_or_default();
        found.push((format!("{package}--{target}"), PathBuf::from(exe)));
    }
    Ok(found)
}

/// `path+file:///x/crates/prism-stream#0.1.0` → `prism-stream`; `...#name@0.1.0` → `name`.
fn package_name(id: &str) -> String {
    let (url, frag) = id.split_once('#').unwrap_or((id, ""));
    match frag.split_once('@') {
        Some((name, _)) => name.to_owned(),
        None => url.rsplit('/').next().unwrap_or(url).to_owned(),
    }
}

fn json_str(line: &str, key: &str) -> Option<String> {
    let start = line.find(key)? + key.len();
    let end = line[start..].find('"')? + start;
    Some(line[start..end].to_owned())
}

fn copy_into(dir: &Path, name: &str, from: &Path) -> Result<u64> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let to = dir.join(name);
    std::fs::copy(from, &to)
        .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))
}

/// Builds the bundle into `dir`; with a `budget`, fails when it is larger.
fn bundle(dir: &Path, budget: Option<u64>, cuda12: bool) -> Result {
    let dir = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        util::root().join(dir)
    };
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| format!("clear {}: {e}", dir.display()))?;
    }
    if cuda12 {
        eprintln!(
            "CUDA 12 build: CUDA 12.0 driver bindings, kernels from the bundled PTX \
             (prism-bench, which needs nvcc 13's runtime, is left out)"
        );
    } else if !prism_kernels_built() {
        eprintln!(
            "no nvcc (or PRISM_NO_NVCC=1): the bundle's kernels load from the bundled PTX \
             through the driver, and it leaves out prism-bench (its CUDA C++ baselines need nvcc)"
        );
    }
    let mut select = vec!["--workspace", "--exclude", "xtask", "--profile", "bundle"];
    let cuda12_features = format!(
        "prism-stream/cuda-12,prism-buffer/cuda-12,prism-pipeline/cuda-12,prism-tests/cuda-12,{BUNDLE_FEATURES}"
    );
    if cuda12 {
        select.extend([
            "--exclude",
            "prism-bench",
            "--no-default-features",
            "--features",
            &cuda12_features,
        ]);
    } else {
        select.extend(["--features", BUNDLE_FEATURES]);
    }
    let tests = built_executables(&[&["test", "--no-run"][..], &select].concat(), true)?;
    let examples = built_executables(
        &[&["build", "--examples", "--bins"][..], &select].concat(),
        false,
    )?;
    let mut bytes = 0;
    let mut test_names = Vec::new();
    // Only binaries with GPU tests (named `gpu_*`) go to the GPU machine:
    // CPU-only tests (proptests, the host backend, compile-fail through
    // rustc) run in CI, and the bundle stays within its budget.
    let mut kept = Vec::new();
    for (name, path) in tests {
        let (ok, list, _) = util::output(std::process::Command::new(&path).arg("--list"))?;
        if ok
            && list
                .lines()
                .any(|l| l.starts_with("gpu_") || l.contains("::gpu_"))
        {
            kept.push((name, path));
        }
    }
    let tests = kept;
    for (name, path) in &tests {
        bytes += copy_into(&dir.join("tests"), name, path)?;
        test_names.push(name.clone());
    }
    let mut example_lines = Vec::new();
    for (name, path) in &examples {
        let short = name.split("--").nth(1).unwrap_or(name).to_owned();
        if short == "prism-bench" && !prism_kernels_built() {
            // Its CUDA C++ baselines need nvcc; it would only say so.
            continue;
        }
        bytes += copy_into(&dir.join("bin"), &short, path)?;
        for (k, (_, _, args)) in EXAMPLE_SMOKE_RUNS
            .iter()
            .filter(|(_, e, _)| *e == short)
            .enumerate()
        {
            example_lines.push(format!("step example-{short}-{k} ./bin/{short} {args}"));
        }
    }
    // The PyTorch baselines of S4, run in the same call when torch is there.
    let py = util::root().join("crates/prism-bench/python/s4_torch.py");
    bytes += copy_into(&dir.join("py"), "s4_torch.py", &py)?;
    bytes += nvtx_bundle(&dir)?;
    test_names.sort();
    let sanitized: Vec<String> = EXAMPLE_SANITIZER_RUNS
        .iter()
        .enumerate()
        .map(|(k, (e, args))| format!("        step \"$tool-example-{e}-{k}\" compute-sanitizer --tool $tool --error-exitcode 99 ./bin/{e} {args}"))
        .collect();
    let script = run_script(&test_names, &example_lines, &sanitized);
    util::write(&dir.join("run.sh"), &script)?;
    // The commit built (marked `-dirty` with uncommitted changes), which
    // run.sh hands to prism-bench's results.json as PRISM_COMMIT.
    util::write(&dir.join("COMMIT"), &format!("{}\n", build_commit()))?;
    make_executable(&dir.join("run.sh"))?;
    eprintln!(
        "bundle written: {} ({} test binaries, {} other binaries, {:.1} MiB)",
        dir.display(),
        tests.len(),
        examples.len(),
        bytes as f64 / (1024.0 * 1024.0)
    );
    if let Some(budget) = budget {
        // What travels is the compressed archive (the binaries shrink about
        // threefold): `tar xzf DIR.tar.gz && DIR/run.sh` on the GPU machine.
        let archive = dir.with_extension("tar.gz");
        let (parent, name) = match (dir.parent(), dir.file_name()) {
            (Some(p), Some(n)) => (p, n),
            _ => return Err(format!("bundle folder {} has no parent", dir.display())),
        };
        let (ok, _, err) = util::output(
            Command::new("tar")
                .arg("czf")
                .arg(&archive)
                .arg("-C")
                .arg(parent)
                .arg(name),
        )?;
        if !ok {
            return Err(format!("tar czf {}: {err}", archive.display()));
        }
        let packed = std::fs::metadata(&archive)
            .map_err(|e| format!("{}: {e}", archive.display()))?
            .len();
        eprintln!(
            "archive written: {} ({:.1} MiB); on the GPU machine: tar xzf {} && {}/run.sh",
            archive.display(),
            packed as f64 / (1024.0 * 1024.0),
            archive
                .file_name()
                .map_or_else(Default::default, |n| n.to_string_lossy()),
            name.to_string_lossy(),
        );
        if packed > budget {
            return Err(format!(
                "bundle archive is {packed} bytes, over the {} MiB budget",
                budget >> 20
            ));
        }
    }
    Ok(())
}

/// Will prism-cuda-sys compile its launchers (nvcc found, not turned off)?
fn prism_kernels_built() -> bool {
    util::find_nvcc().is_some() && std::env::var_os("PRISM_NO_NVCC").is_none_or(|v| v != "1")
}

#[cfg(unix)]
fn make_executable(path: &Path) -> Result {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

#[cfg(not(unix))]
fn make_executable(_: &Path) -> Result {
    Ok(())
}

/// The NVTX injection counter, compiled here for the bundle
/// (`nvtx/libprism_nvtx_count.so`, with the system's C compiler: `$CC` or
/// `cc`), and the script that checks its counts (`nvtx/check.sh`). Returns
/// the bytes added.
fn nvtx_bundle(dir: &Path) -> Result<u64> {
    let root = util::root();
    let nvtx = dir.join("nvtx");
    std::fs::create_dir_all(&nvtx).map_err(|e| format!("create {}: {e}", nvtx.display()))?;
    let so = nvtx.join(NVTX_COUNTER);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    util::run(
        Command::new(&cc)
            .args(["-shared", "-fPIC", "-O2", "-I"])
            .arg(root.join("crates/prism-stream/third_party/nvtx"))
            .arg(root.join("tests/nvtx/nvtx_count.c"))
            .arg("-o")
            .arg(&so)
            .arg("-lpthread"),
    )?;
    let check = root.join("tests/nvtx/check.sh");
    let bytes = copy_into(&nvtx, "check.sh", &check)?;
    make_executable(&nvtx.join("check.sh"))?;
    let so_bytes = std::fs::metadata(&so)
        .map_err(|e| format!("{}: {e}", so.display()))?
        .len();
    Ok(bytes + so_bytes)
}

/// The injection library's file name in the bundle's `nvtx/`.
const NVTX_COUNTER: &str = "libprism_nvtx_count.so";

/// run.sh's NVTX step (on by default, `NVTX=0` skips it): the README's main
/// job (`streaming`, no arguments: 4 GiB pinned, a warm-up and a measured
/// run) and the `coordinator` example, each with the counter injected
/// (`NVTX_INJECTION64_PATH`), then `nvtx/check.sh` on the counts: a
/// `run_pinned` range per run; `upload`, `fma` and `download` once per
/// chunk (the stats give the chunks); the coordinator's two uploads, two
/// computes by name, two downloads and two waits; every push popped on its
/// thread, every range in the `prism` domain. Counts and logs go to
/// `$LOGS/nvtx/` and `$LOGS/nvtx-*.log`.
fn nvtx_steps() -> String {
    format!(
        r#"if [ "${{NVTX:-1}}" = 1 ]; then
    mkdir -p "$LOGS/nvtx"
    nvtx_lib="$PWD/nvtx/{NVTX_COUNTER}"
    step nvtx-streaming env NVTX_INJECTION64_PATH="$nvtx_lib" PRISM_NVTX_COUNT_OUT="$LOGS/nvtx/streaming.counts" ./bin/streaming --trace "$LOGS/nvtx/streaming.trace.json"
    step nvtx-check-streaming bash ./nvtx/check.sh streaming run_pinned "$LOGS/nvtx/streaming.counts" "$LOGS/nvtx-streaming.log"
    step nvtx-coordinator env NVTX_INJECTION64_PATH="$nvtx_lib" PRISM_NVTX_COUNT_OUT="$LOGS/nvtx/coordinator.counts" ./bin/coordinator
    step nvtx-check-coordinator bash ./nvtx/check.sh coordinator "$LOGS/nvtx/coordinator.counts" "$LOGS/nvtx-coordinator.log"
fi"#
    )
}

/// `git rev-parse HEAD`, with `-dirty` when tracked files have uncommitted
/// changes; `unknown` outside a git checkout.
fn build_commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(util::root())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(head) => match git(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(changes) if !changes.is_empty() => format!("{head}-dirty"),
            _ => head,
        },
        None => "unknown".to_owned(),
    }
}

fn run_script(tests: &[String], examples: &[String], sanitized: &[String]) -> String {
    let test_list = tests.join(" ");
    let example_steps = examples.join("\n");
    let sanitized_examples = sanitized.join("\n");
    let nvtx_steps = nvtx_steps();
    format!(
        r#"#!/usr/bin/env bash
# Generated by `cargo xtask gpu-test --bundle`: runs prism's GPU tests on a
# machine with an NVIDIA driver and no Rust toolchain. Logs go to $LOGS
# (default ./logs); with $OUT set, all logs are also gathered into
# $OUT/all-logs.txt and the benchmark and trace files copied there.
# Exit status: non-zero if any step failed.
#   SANITIZE=0 skips the compute-sanitizer pass.   ONLY=regex runs matching tests only.
#   TOOLS="memcheck initcheck" picks the sanitizer tools (default: all four).
#   EXAMPLES=0 skips the examples and the benchmark.
#   SOAK=1 adds the soak run (SOAK_ITERATIONS, default 100000; SOAK_TIMEOUT s).
#   NVTX=0 skips the NVTX range counts (the main job and the coordinator
#   example with nvtx/{NVTX_COUNTER} injected, checked by nvtx/check.sh).
set -u
cd "$(dirname "$0")"
LOGS=${{LOGS:-./logs}}
mkdir -p "$LOGS"
export PRISM_REQUIRE_GPU=1
# The commit the bundle was built from, for prism-bench's results.json.
[ -f COMMIT ] && export PRISM_COMMIT="${{PRISM_COMMIT:-$(cat COMMIT)}}"
# The NVTX counter for prism-tests' nvtx test binary (it compiles its own
# where there is a C compiler and this is not set).
export PRISM_NVTX_COUNT_SO="$PWD/nvtx/{NVTX_COUNTER}"
failed=()
step() {{
    local name=$1; shift
    echo "=== $name: $*"
    local t0=$(date +%s%N)
    timeout "${{STEP_TIMEOUT:-150}}" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    local t1=$(date +%s%N)
    grep -E "^test result|SKIPPED|panicked|FAILED|ERROR SUMMARY|^prism|^  " "$LOGS/$name.log" | tail -40
    echo "--- $name: rc=$rc ($(( (t1 - t0) / 1000000 )) ms)"
    [ $rc -eq 0 ] || failed+=("$name")
}}
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv
for t in {test_list}; do
    if [ -n "${{ONLY:-}}" ] && ! [[ $t =~ $ONLY ]]; then continue; fi
    step "test-$t" ./tests/$t --test-threads=1
done
if [ "${{EXAMPLES:-1}}" = 1 ]; then
{example_steps}
    if [ -x ./bin/prism-bench ] && python3 -c "import torch" 2>/dev/null; then
        mkdir -p "$LOGS/bench"
        step torch-s4 python3 ./py/s4_torch.py --out "$LOGS/bench/torch-s4.json"
    else
        echo "torch-s4: SKIPPED (no prism-bench in this bundle, or no python3 with torch here)"
    fi
fi
{nvtx_steps}
if [ "${{SOAK:-0}}" = 1 ]; then
    STEP_TIMEOUT=${{SOAK_TIMEOUT:-540}} step soak ./bin/soak --iterations "${{SOAK_ITERATIONS:-100000}}" --out "$LOGS/soak"
fi
if [ "${{SANITIZE:-1}}" = 1 ]; then
    export PRISM_TEST_SCALE=small PRISM_UNDER_SANITIZER=1
    for tool in ${{TOOLS:-{SANITIZER_TOOLS}}}; do
        for t in {test_list}; do
            if [ -n "${{ONLY:-}}" ] && ! [[ $t =~ $ONLY ]]; then continue; fi
            # Only binaries with GPU tests; fault-injection tests fault on purpose.
            ./tests/$t --list 2>/dev/null | grep "gpu_" | grep -vq {FAULT_TEST_MARK} || continue
            step "$tool-$t" compute-sanitizer --tool $tool --error-exitcode 99 ./tests/$t --test-threads=1 gpu_ --skip {FAULT_TEST_MARK} --skip {THREADS_TEST_MARK}
            # racecheck (shared-memory hazards inside kernels, which the other
            # tests cover) hung in the multi-threaded test, alone too: skipped there.
            [ $tool = racecheck ] && continue
            for tt in $(./tests/$t --list 2>/dev/null | grep ': test' | grep {THREADS_TEST_MARK} | cut -d: -f1); do
                step "$tool-$t-$tt" compute-sanitizer --tool $tool --error-exitcode 99 ./tests/$t --exact $tt --test-threads=1
            done
        done
        if [ "${{EXAMPLES:-1}}" = 1 ]; then
{sanitized_examples}
        fi
    done
fi
if [ -n "${{OUT:-}}" ]; then
    for f in "$LOGS"/*.log; do echo "==== $f"; cat "$f"; done > "$OUT/all-logs.txt" 2>/dev/null
    cp "$LOGS"/*.trace.json "$LOGS"/bench/results.json "$LOGS"/bench/torch-s4.json "$LOGS"/bench/chart.svg "$LOGS"/soak/soak.csv "$LOGS"/soak/soak.png "$OUT"/ 2>/dev/null
fi
if [ ${{#failed[@]}} -eq 0 ]; then echo "ALL STEPS PASSED"; else echo "FAILED STEPS: ${{failed[*]}}"; exit 1; fi
"#
    )
}
