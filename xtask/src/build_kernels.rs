//! `cargo xtask build-kernels [--check]`: every `kernels/*.cu` to PTX and cubin
//! for each configured architecture under `target/kernels/<arch>/`, with
//! ptxas' resource report per kernel. Fails on any spill or compiler warning.
//! `--check` also verifies the committed generated files are fresh.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{self, Result};

const DEFAULT_ARCHS: &[&str] = &["80", "90"];

pub fn run(check: bool) -> Result {
    if check {
        crate::bindgen::check()?;
        check_stubs()?;
    }
    let nvcc = util::find_nvcc().ok_or(
        "nvcc not found (looked at $NVCC, $CUDA_HOME, $CUDA_PATH, ./.cuda and PATH); \
         run `cargo xtask install-nvcc` first",
    )?;
    let archs = archs();
    let kernels = util::root().join("kernels");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernels)
        .map_err(|e| format!("read {}: {e}", kernels.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();

    let mut problems = Vec::new();
    println!(
        "{:<6} {:<28} {:>5} {:>7} {:>7} {:>7} {:>7}",
        "arch", "kernel", "regs", "stack", "spill-s", "spill-l", "smem"
    );
    for arch in &archs {
        let out = util::root()
            .join("target/kernels")
            .join(format!("sm_{arch}"));
        std::fs::create_dir_all(&out).map_err(|e| format!("create {}: {e}", out.display()))?;
        for src in &sources {
            let stem = src
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            nvcc_step(
                &nvcc,
                src,
                &kernels,
                arch,
                "-ptx",
                &out.join(format!("{stem}.ptx")),
            )?;
            let (_, report) = nvcc_step(
                &nvcc,
                src,
                &kernels,
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
        util::root().join("target/kernels").display()
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

/// Every launcher the header declares must have a stub in `kernels/stub.c`.
fn check_stubs() -> Result {
    let header = util::read(&crate::bindgen::header_path())?;
    let stub = util::read(&util::root().join("kernels/stub.c"))?;
    let declared = launcher_names(&header, ';');
    let defined = launcher_names(&stub, '{');
    let missing: Vec<_> = declared.iter().filter(|n| !defined.contains(n)).collect();
    if missing.is_empty() {
        eprintln!(
            "stubs complete: kernels/stub.c defines all {} launchers",
            declared.len()
        );
        Ok(())
    } else {
        Err(format!("kernels/stub.c lacks stubs for {missing:?}: add one per launcher returning PRISM_ERR_KERNELS_NOT_BUILT"))
    }
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
