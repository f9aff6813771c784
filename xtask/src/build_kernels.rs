//! `cargo xtask build-kernels [--check]`:
//! - the committed PTX: `kernels/prism_kernels.ptx` (prism's kernels, which a
//!   build without nvcc launches through the driver API) and
//!   `crates/prism-pipeline/examples/kernels/*.ptx` (the examples' and
//!   tests' "user" kernels: `scale_add`, `pagerank`, `table_acc`, `combine`), for
//!   compute_75 with the `.version` directive lowered to PTX ISA 8.0
//!   (CUDA 12.0), so drivers from CUDA 12.0 on load them;
//! - every kernel source to PTX and cubin for each configured architecture
//!   under `target/kernels/sm_XX/`, with ptxas' resource report per kernel.
//!   Fails on any spill or compiler warning.
//!
//! `--check` writes nothing into the tree: it fails when a committed file is
//! stale (PTX, bindings, stubs) and when CUDA 12.0's ptxas (installed by
//! `cargo xtask install-nvcc`) rejects the committed PTX for any target.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{self, Result};

const DEFAULT_ARCHS: &[&str] = &["75", "80", "86", "89", "90"];

/// The virtual architecture of the committed PTX: the oldest GPU prism supports.
const PTX_ARCH: &str = "compute_75";
/// The PTX ISA the committed PTX declares: CUDA 12.0's, the oldest driver prism supports.
pub const PTX_ISA: (u32, u32) = (8, 0);

/// Committed PTX files: (source, generated), relative to the workspace root.
const COMMITTED_PTX: &[(&str, &str)] = &[
    ("kernels/prism_kernels.cu", "kernels/prism_kernels.ptx"),
    (
        "crates/prism-pipeline/examples/kernels/scale_add.cu",
        "crates/prism-pipeline/examples/kernels/scale_add.ptx",
    ),
    (
        "crates/prism-pipeline/examples/kernels/pagerank.cu",
        "crates/prism-pipeline/examples/kernels/pagerank.ptx",
    ),
    (
        "crates/prism-pipeline/examples/kernels/table_acc.cu",
        "crates/prism-pipeline/examples/kernels/table_acc.ptx",
    ),
    (
        "crates/prism-pipeline/examples/kernels/combine.cu",
        "crates/prism-pipeline/examples/kernels/combine.ptx",
    ),
];

/// Sources compiled to cubin per architecture (resource report).
const SOURCES: &[&str] = &[
    "kernels/prism_kernels.cu",
    "crates/prism-bench/cuda/baselines.cu",
    "crates/prism-bench/cuda/s10.cu",
    "crates/prism-pipeline/examples/kernels/scale_add.cu",
    "crates/prism-pipeline/examples/kernels/pagerank.cu",
    "crates/prism-pipeline/examples/kernels/table_acc.cu",
    "crates/prism-pipeline/examples/kernels/combine.cu",
];

pub fn run(check: bool) -> Result {
    if check {
        crate::bindgen::check()?;
        check_stubs()?;
    }
    let nvcc = util::find_nvcc().ok_or(
        "nvcc not found (looked at $NVCC, $CUDA_HOME, $CUDA_PATH, ./.cuda and PATH); \
         run `cargo xtask install-nvcc` first",
    )?;
    committed_ptx(&nvcc, check)?;
    let archs = archs();
    let root = util::root();
    let include = root.join("kernels");

    let mut problems = Vec::new();
    println!(
        "{:<6} {:<28} {:>5} {:>7} {:>7} {:>7} {:>7}",
        "arch", "kernel", "regs", "stack", "spill-s", "spill-l", "smem"
    );
    for arch in &archs {
        let out = root.join("target/kernels").join(format!("sm_{arch}"));
        std::fs::create_dir_all(&out).map_err(|e| format!("create {}: {e}", out.display()))?;
        for src in SOURCES.iter().map(|s| root.join(s)) {
            let stem = src
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            nvcc_step(
                &nvcc,
                &src,
                &include,
                arch,
                "-ptx",
                &out.join(format!("{stem}.ptx")),
            )?;
            let (_, report) = nvcc_step(
                &nvcc,
                &src,
                &include,
                arch,
                "-cubin",
                &out.join(format!("{stem}.cubin")),
            )?;
            for line in report.lines().filter(|l| l.contains("warning")) {
                problems.push(format!("sm_{arch} {stem}: {line}"));
            }
            for k in parse_report(&report) {
                println!(
                    "sm_{:<3} {:<28} {:>5} {:>7} {:>7} {:>7} {:>7}",
                    arch, k.name, k.registers, k.stack, k.spill_stores, k.spill_loads, k.smem
                );
                if k.spill_stores > 0 || k.spill_loads > 0 {
                    problems.push(format!(
                        "sm_{arch} {}: {} bytes spilled",
                        k.name,
                        k.spill_stores + k.spill_loads
                    ));
                }
            }
        }
    }
    println!(
        "PTX and cubin written under {}",
        root.join("target/kernels").display()
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "kernel build problems:\n  {}",
            problems.join("\n  ")
        ))
    }
}

/// Makes (or, with `check`, compares) every committed PTX file, then has
/// CUDA 12.0's ptxas assemble it for every default target.
fn committed_ptx(nvcc: &Path, check: bool) -> Result {
    let root = util::root();
    let tmp = root.join("target/kernels/committed");
    std::fs::create_dir_all(&tmp).map_err(|e| format!("create {}: {e}", tmp.display()))?;
    let mut stale = Vec::new();
    for (src, dst) in COMMITTED_PTX {
        let raw = tmp.join(
            Path::new(dst)
                .file_name()
                .expect("committed PTX paths name files"),
        );
        let mut cmd = Command::new(nvcc);
        cmd.args(["-ptx", &format!("-arch={PTX_ARCH}"), "-std=c++17", "-O3"])
            .args(["-Werror", "all-warnings", "-I"])
            .arg(root.join("kernels"))
            .arg("-o")
            .arg(&raw)
            .arg(root.join(src));
        let (ok, out, err) = util::output(&mut cmd)?;
        if !ok {
            return Err(format!("`{}` failed:\n{out}{err}", util::show(&cmd)));
        }
        let nvcc_ptx = util::read(&raw)?;
        let text = committed_text(src, &nvcc_ptx)?;
        same_code_after_lowering(nvcc, &tmp, dst, &nvcc_ptx, &text)?;
        let path = root.join(dst);
        if check {
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            if committed != text {
                stale.push(*dst);
            }
        } else {
            std::fs::write(&path, &text).map_err(|e| format!("write {}: {e}", path.display()))?;
            eprintln!("wrote {dst}");
        }
        std::fs::write(&raw, &text).map_err(|e| format!("write {}: {e}", raw.display()))?;
        ptxas12_check(&raw, dst, check)?;
    }
    if stale.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "stale committed PTX: {stale:?} no longer matches its source; run `cargo xtask build-kernels` and commit the result"
        ))
    }
}

/// nvcc's PTX with a header saying where it came from, and its `.version`
/// lowered to [`PTX_ISA`]. Fails if nvcc declared an older ISA than that (the
/// floor would be wrong) or no version at all.
fn committed_text(src: &str, ptx: &str) -> Result<String> {
    let (major, minor) = PTX_ISA;
    let mut found = None;
    let body: Vec<String> = ptx
        .lines()
        .map(|line| match line.strip_prefix(".version ") {
            Some(v) => {
                found = Some(v.trim().to_owned());
                format!(".version {major}.{minor}")
            }
            None => line.to_owned(),
        })
        .collect();
    let declared = found.ok_or(format!("nvcc's PTX of {src} has no .version line"))?;
    let parsed: Option<(u32, u32)> = declared
        .split_once('.')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
    match parsed {
        Some(v) if v >= PTX_ISA => {}
        _ => {
            return Err(format!(
            "nvcc's PTX of {src} declares .version {declared}, expected {major}.{minor} or newer"
        ))
        }
    }
    Ok(format!(
        "//\n// {src} as PTX, made by `cargo xtask build-kernels` (nvcc -ptx \
         -arch={PTX_ARCH} -O3). Do not edit.\n// nvcc declared .version {declared}; it is \
         lowered to {major}.{minor} (CUDA 12.0) so that drivers from CUDA 12.0 on\n// load it, \
         and `cargo xtask build-kernels --check` has CUDA 12.0's ptxas\n// assemble it for \
         sm_{} to prove the code needs nothing newer.\n{}\n",
        DEFAULT_ARCHS.join(", sm_"),
        body.join("\n")
    ))
}

/// The lowered `.version` must not change what the code means: nvcc's own
/// ptxas assembles nvcc's PTX and the lowered text to the same machine code
/// (compared for sm_75 and sm_90), or the check fails.
fn same_code_after_lowering(
    nvcc: &Path,
    tmp: &Path,
    name: &str,
    original: &str,
    lowered: &str,
) -> Result {
    let ptxas = nvcc.with_file_name("ptxas");
    let stem = Path::new(name)
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    for arch in ["75", "90"] {
        let mut cubins = Vec::new();
        for (tag, text) in [("nvcc", original), ("lowered", lowered)] {
            let ptx = tmp.join(format!("{stem}.{tag}.ptx"));
            let cubin = tmp.join(format!("{stem}.{tag}.sm_{arch}.cubin"));
            std::fs::write(&ptx, text).map_err(|e| format!("write {}: {e}", ptx.display()))?;
            let mut cmd = Command::new(&ptxas);
            cmd.arg(format!("-arch=sm_{arch}"))
                .arg(&ptx)
                .arg("-o")
                .arg(&cubin);
            let (ok, out, err) = util::output(&mut cmd)?;
            if !ok {
                return Err(format!("`{}` failed:\n{out}{err}", util::show(&cmd)));
            }
            cubins
                .push(std::fs::read(&cubin).map_err(|e| format!("read {}: {e}", cubin.display()))?);
        }
        if cubins[0] != cubins[1] {
            return Err(format!(
                "{name}: lowering .version changes the sm_{arch} machine code ptxas makes; \
                 the kernels now need a newer PTX ISA than {}.{}",
                PTX_ISA.0, PTX_ISA.1
            ));
        }
    }
    eprintln!("{name}: the lowered .version gives the same sm_75 and sm_90 code as nvcc's");
    Ok(())
}

/// CUDA 12.0's ptxas (from `cargo xtask install-nvcc`), which refuses PTX
/// newer than ISA 8.0 or instructions CUDA 12.0 did not have.
fn ptxas12() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PRISM_PTXAS_12") {
        return Some(PathBuf::from(p));
    }
    let lib = util::root().join(util::LOCAL_CUDA_DIR).join("lib");
    std::fs::read_dir(lib).ok()?.flatten().find_map(|e| {
        let p = e.path().join("site-packages/nvidia/cuda_nvcc/bin/ptxas");
        p.is_file().then_some(p)
    })
}

fn ptxas12_check(ptx: &Path, name: &str, required: bool) -> Result {
    let Some(ptxas) = ptxas12() else {
        let msg =
            "CUDA 12.0's ptxas not found (run `cargo xtask install-nvcc`, or set PRISM_PTXAS_12)";
        return if required {
            Err(msg.to_owned())
        } else {
            eprintln!("note: {msg}; the committed PTX was not assembled with it");
            Ok(())
        };
    };
    for arch in DEFAULT_ARCHS {
        let mut cmd = Command::new(&ptxas);
        cmd.arg(format!("-arch=sm_{arch}"))
            .arg(ptx)
            .arg("-o")
            .arg("/dev/null");
        let (ok, out, err) = util::output(&mut cmd)?;
        if !ok {
            return Err(format!(
                "CUDA 12.0's ptxas rejects {name} for sm_{arch}: drivers of CUDA 12.x could not load it\n{out}{err}"
            ));
        }
    }
    eprintln!(
        "{name}: CUDA 12.0's ptxas assembles it for sm_{}",
        DEFAULT_ARCHS.join(", sm_")
    );
    Ok(())
}

fn archs() -> Vec<String> {
    match std::env::var("PRISM_CUDA_ARCH") {
        Ok(spec) if !spec.trim().is_empty() => spec
            .split(',')
            .filter_map(|s| {
                let s = s.trim();
                // Accept `sm_90` or `90`; full -gencode strings name their own arch.
                let digits: String = s
                    .trim_start_matches("sm_")
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                (!digits.is_empty() && !s.contains('=')).then_some(digits)
            })
            .collect(),
        _ => DEFAULT_ARCHS.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn nvcc_step(
    nvcc: &Path,
    src: &Path,
    include: &Path,
    arch: &str,
    mode: &str,
    out: &Path,
) -> Result<(bool, String)> {
    let mut cmd = Command::new(nvcc);
    cmd.arg(mode)
        .arg(format!("-arch=sm_{arch}"))
        .args([
            "-std=c++17",
            "-O3",
            "-Werror",
            "all-warnings",
            "-Xptxas",
            "-v,-warn-spills,-warn-lmem-usage",
        ])
        .arg("-I")
        .arg(include)
        .arg("-o")
        .arg(out)
        .arg(src);
    let (ok, stdout, stderr) = util::output(&mut cmd)?;
    if !ok {
        return Err(format!("`{}` failed:\n{stdout}{stderr}", util::show(&cmd)));
    }
    Ok((ok, format!("{stdout}{stderr}")))
}

#[derive(Debug, Default)]
struct KernelReport {
    name: String,
    registers: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
    smem: u32,
}

/// Reads ptxas `-v` output: one block per "Compiling entry function" line.
fn parse_report(text: &str) -> Vec<KernelReport> {
    let mut kernels: Vec<KernelReport> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mangled = rest.split('\'').next().unwrap_or(rest);
            kernels.push(KernelReport {
                name: short_name(mangled),
                ..Default::default()
            });
        } else if let Some(k) = kernels.last_mut() {
            if line.contains("bytes stack frame") {
                k.stack = number_before(line, "bytes stack frame");
                k.spill_stores = number_before(line, "bytes spill stores");
                k.spill_loads = number_before(line, "bytes spill loads");
            } else if line.contains("registers") {
                k.registers = number_before(line, "registers");
                k.smem = number_before(line, "bytes smem");
            }
        }
    }
    kernels
}

/// `_ZN<ns>13check_patternE...` → `check_pattern`; unmangled names pass through.
fn short_name(mangled: &str) -> String {
    let Some(body) = mangled.strip_prefix("_ZN") else {
        return mangled.to_owned();
    };
    // Walk <len><ident> pairs; the last one before 'E' is the function name.
    let bytes = body.as_bytes();
    let (mut i, mut last) = (0, mangled.to_owned());
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let len: usize = body[start..i].parse().unwrap_or(0);
        if i + len > bytes.len() {
            break;
        }
        last = body[i..i + len].to_owned();
        i += len;
    }
    last
}

fn number_before(line: &str, label: &str) -> u32 {
    line.split(label)
        .next()
        .and_then(|head| head.split([' ', ',', ':']).rfind(|t| !t.is_empty()))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

/// Every launcher a header declares must have a stub: `kernels/stub.c` for
/// `kernels/prism_kernels.h`, and the benchmark's for its baselines.
fn check_stubs() -> Result {
    let root = util::root();
    for (header, stub) in [
        ("kernels/prism_kernels.h", "kernels/stub.c"),
        (
            "crates/prism-bench/cuda/baselines.h",
            "crates/prism-bench/cuda/baselines_stub.c",
        ),
    ] {
        let declared = launcher_names(&util::read(&root.join(header))?, ';');
        let defined = launcher_names(&util::read(&root.join(stub))?, '{');
        let missing: Vec<_> = declared.iter().filter(|n| !defined.contains(n)).collect();
        if !missing.is_empty() {
            return Err(format!("{stub} lacks stubs for {missing:?}: add one per launcher declared in {header}, returning PRISM_ERR_KERNELS_NOT_BUILT"));
        }
        eprintln!(
            "stubs complete: {stub} defines all {} launchers of {header}",
            declared.len()
        );
    }
    Ok(())
}

/// Names of `int prism_*(...)` functions whose parameter list ends with `end`.
fn launcher_names(text: &str, end: char) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(pos) = rest.find("int prism_") {
        let after = &rest[pos + 4..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let tail = &after[name.len()..];
        if tail.starts_with('(') {
            if let Some(close) = tail.find(')') {
                if tail[close + 1..].trim_start().starts_with(end) {
                    names.push(name.clone());
                }
            }
        }
        rest = &after[name.len()..];
    }
    names
}
