//! `cargo xtask bench-doc`: docs/BENCHMARKS.md made from the benchmark's
//! JSON. Every `*.json` under docs/bench (or `--from DIR`) but traces
//! (`*.trace.json`) is a `results.json` of `prism-bench`; for each
//! workload the document shows, per card, the newest figure: the newest
//! run by its recorded UTC date (`date_utc`), or for older files by the
//! date their name starts with (`2026-11-27-…`), then by the run number in
//! the name (`…-run31…`). Quick runs (`--quick`, sizes / 16) are listed
//! but not used. `DIR/PENDING.md`, when present, ends the document
//! verbatim but for its relative links, rebased from DIR to docs/ (figures
//! measured but not yet saved as JSON). With `--check`
//! it writes nothing and fails when docs/BENCHMARKS.md is not what it
//! would write (CI).
//!
//! No figure is computed here but a ratio of two figures in the same file
//! (what `prism-bench` prints itself); every figure comes from the JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::util;

/// The document, from the workspace root.
const DOC: &str = "docs/BENCHMARKS.md";
/// Where the results are, from the workspace root.
const FROM: &str = "docs/bench";
/// Text for the end of the document, in the results' folder.
const PENDING: &str = "PENDING.md";

pub fn run(from: Option<&Path>, check: bool) -> util::Result {
    let root = util::root();
    let from = from.map_or_else(|| root.join(FROM), Path::to_path_buf);
    let doc = root.join(DOC);
    let text = generate(&from, &doc)?;
    if check {
        check_doc(&doc, &text)
    } else {
        util::write(&doc, &text)?;
        println!(
            "wrote {DOC} ({} lines) from {}",
            text.lines().count(),
            from.display()
        );
        Ok(())
    }
}

/// The document made from the results in `from`, its links relative to
/// the folder of `doc`.
fn generate(from: &Path, doc: &Path) -> util::Result<String> {
    let sources = load(from)?;
    let pending = from.join(PENDING);
    let pending = if pending.is_file() {
        Some(util::read(&pending)?)
    } else {
        None
    };
    let base = link_base(doc.parent().unwrap_or(Path::new(".")), from);
    let pending = pending.map(|p| rebase_links(&p, &base));
    Ok(render(&sources, pending.as_deref(), &base))
}

/// Fails, saying where, when `doc` is not `text`.
fn check_doc(doc: &Path, text: &str) -> util::Result {
    let old = util::read(doc)?;
    if old == text {
        println!("{} is what `cargo xtask bench-doc` makes", doc.display());
        return Ok(());
    }
    let at = old
        .lines()
        .zip(text.lines())
        .position(|(a, b)| a != b)
        .unwrap_or_else(|| old.lines().count().min(text.lines().count()));
    Err(format!(
        "{} differs from what `cargo xtask bench-doc` makes from the results (first at line {}: {:?} here, {:?} generated): run `cargo xtask bench-doc` and commit the document",
        doc.display(),
        at + 1,
        old.lines().nth(at).unwrap_or("(end of file)"),
        text.lines().nth(at).unwrap_or("(end of file)"),
    ))
}

// ---------------------------------------------------------------------------
// results.json, as prism-bench writes it. Every field has a default, so
// older files (without the provenance fields or later sections) load.

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Report {
    device: String,
    driver_cuda_version: String,
    driver_version: Option<String>,
    pcie_link: Option<String>,
    date_utc: Option<String>,
    git_commit: Option<String>,
    quick: bool,
    reps: usize,
    workloads: Vec<Workload>,
    steps: Vec<Step>,
    stream: Option<Stream>,
    pageable: Vec<Pageable>,
    short: Option<Short>,
    items_sweep: Vec<SweepRow>,
    auto: Vec<Auto>,
    multi: Option<Multi>,
    iterations: Option<Iterations>,
    fanout: Option<Fanout>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Workload {
    workload: String,
    total_mib: usize,
    piece_kib: usize,
    items: bool,
    fma_iters: u32,
    t_bidir_ms: f64,
    t_kernel_ms: f64,
    bound_ms: f64,
    cases: Vec<Case>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Case {
    implementation: String,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    gbps: f64,
    bound_over_measured: f64,
    speed_vs_cxx: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Step {
    kib: usize,
    cxx_us: f64,
    cxx_graph_us: f64,
    prism_us: f64,
    prism_over_cxx: f64,
    prism_pinned_us: f64,
    prism_pinned_over_cxx: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Stream {
    gib: f64,
    chunk_mib: usize,
    t_bidir_ms: f64,
    t_host_ms: f64,
    bound_ms: f64,
    prism_ms: f64,
    bound_over_measured: f64,
    checked_elements: u64,
    peak_rss_mib: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Pageable {
    mib: usize,
    t_bidir_ms: f64,
    t_staging_ms: f64,
    bound_ms: f64,
    prism_ms: f64,
    bound_over_measured: f64,
    threads: usize,
    sweep: Vec<SweepRow>,
    repeated: Option<Repeated>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SweepRow {
    chunk_mib: usize,
    slots: usize,
    ms: f64,
    host_copy_ms: f64,
    host_wait_ms: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Repeated {
    register_ms: f64,
    first_run_ms: f64,
    run_ms: f64,
    unregister_ms: f64,
    run_over_bidir: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Short {
    mib: usize,
    chunk_mib: usize,
    t_bidir_ms: f64,
    /// (ramp, median ms, chunks, stats overlap efficiency)
    runs: Vec<(bool, f64, u64, f64)>,
    /// (ramp, median ms) with timing events off.
    untimed: Vec<(bool, f64)>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Auto {
    workload: String,
    /// (chunk MiB, slots, median ms)
    fixed: Vec<(usize, usize, f64)>,
    auto_ms: f64,
    auto_chunk_mib: f64,
    auto_slots: usize,
    auto_vs_best: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Multi {
    devices: Vec<String>,
    total_mib: usize,
    joint_bidir_ms: f64,
    joint_per_gpu_ms: Vec<f64>,
    single_bidir_ms: f64,
    rows: Vec<MultiRow>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MultiRow {
    what: String,
    gpus: usize,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    gbps: f64,
    bound_over_measured: f64,
    speedup_over_one_gpu: f64,
    chunks_per_gpu: Vec<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Iterations {
    resident_mib: f64,
    window: usize,
    warmup: usize,
    iters: usize,
    rounds: usize,
    cases: Vec<IterationCase>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct IterationCase {
    implementation: String,
    best_us: f64,
    runs_us: Vec<f64>,
    over_cxx_graph: f64,
    acc_bit_exact: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Fanout {
    mib: usize,
    reps: usize,
    branches: Vec<String>,
    rows: Vec<FanoutRow>,
    concurrency: Option<Concurrency>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FanoutRow {
    branches: usize,
    chunk_mib: usize,
    bound_ms: f64,
    prism_ms: f64,
    min_ms: f64,
    max_ms: f64,
    bound_over_measured: f64,
    gbps: f64,
    chunks: u64,
    checked_elements: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Concurrency {
    mib: usize,
    chunk_kib: usize,
    branches: usize,
    iters: u32,
    one_lane_ms: f64,
    concurrent_ms: f64,
}

// ---------------------------------------------------------------------------
// The files.

/// One results file.
#[derive(Debug)]
struct Source {
    /// File name inside the results folder.
    name: String,
    /// What orders runs: `date_utc`, else the name's `YYYY-MM-DD`.
    date: String,
    /// `N` of `…runN…` in the name.
    run: Option<u64>,
    report: Report,
}

impl Source {
    /// Newer sorts later.
    fn order(&self) -> (&str, u64, &str) {
        (&self.date, self.run.unwrap_or(0), &self.name)
    }

    /// `2026-12-07 16:21 UTC`, or `2026-11-27` where only the name dates it.
    fn date_text(&self) -> String {
        match &self.report.date_utc {
            Some(d) if d.len() >= 16 && d.as_bytes()[10] == b'T' => {
                format!("{} {} UTC", &d[..10], &d[11..16])
            }
            _ => self.date.clone(),
        }
    }
}

/// Every results file in `dir`, by name.
fn load(dir: &Path) -> util::Result<Vec<Source>> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("read {}: {e}", dir.display()))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("read {}: {e}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".json") && !name.ends_with(".trace.json") && entry.path().is_file() {
            names.push(name);
        }
    }
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let path = dir.join(&name);
            parse(&name, &util::read(&path)?).map_err(|e| format!("{}: {e}", path.display()))
        })
        .collect()
}

/// One results file from its name and text.
fn parse(name: &str, text: &str) -> util::Result<Source> {
    let report: Report =
        serde_json::from_str(text).map_err(|e| format!("not a prism-bench results.json: {e}"))?;
    if report.device.is_empty() {
        return Err("not a prism-bench results.json: no `device`".into());
    }
    let date = match &report.date_utc {
        Some(d) if is_date(d) => d.clone(),
        Some(d) => return Err(format!("`date_utc` {d:?} is not an RFC 3339 UTC time")),
        None => name
            .get(..10)
            .filter(|d| is_date(d))
            .ok_or_else(|| {
                "no `date_utc` in it and its name does not start with the run's date (YYYY-MM-DD-…)"
                    .to_owned()
            })?
            .to_owned(),
    };
    Ok(Source {
        name: name.to_owned(),
        date,
        run: run_number(name),
        report,
    })
}

/// Starts with `YYYY-MM-DD`.
fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 10
        && b[4] == b'-'
        && b[7] == b'-'
        && [0, 1, 2, 3, 5, 6, 8, 9]
            .iter()
            .all(|&i| b[i].is_ascii_digit())
}

/// `31` of `2026-11-27-h200-results-run31.json`.
fn run_number(name: &str) -> Option<u64> {
    let at = name.find("run")? + 3;
    let digits: String = name[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The folder `from` as a link from the folder `doc_dir` (`bench` for
/// docs/bench from docs/).
fn link_base(doc_dir: &Path, from: &Path) -> String {
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (doc_dir, from) = (abs(doc_dir), abs(from));
    let a: Vec<Component> = doc_dir.components().collect();
    let b: Vec<Component> = from.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    if common == 0 {
        return from.to_string_lossy().into_owned();
    }
    let mut rel = PathBuf::new();
    for _ in common..a.len() {
        rel.push("..");
    }
    for c in &b[common..] {
        rel.push(c);
    }
    let rel = rel.to_string_lossy().replace('\\', "/");
    if rel.is_empty() {
        ".".into()
    } else {
        rel
    }
}

/// `text` with each relative Markdown link target (`](x)`) seen from
/// `base` instead (`../gpu-runs/a.md` from `bench` is `gpu-runs/a.md`).
fn rebase_links(text: &str, base: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        let (head, tail) = rest.split_at(at + 2);
        out.push_str(head);
        let end = tail.find(')').unwrap_or(tail.len());
        let target = &tail[..end];
        let absolute = target.contains("://")
            || target.starts_with(['#', '/'])
            || target.starts_with("mailto:");
        if absolute || target.is_empty() {
            out.push_str(target);
        } else {
            out.push_str(&normalize(&format!("{base}/{target}")));
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// `a/b/../c` as `a/c`; leading `..` stay.
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." if parts.last().is_some_and(|l| *l != "..") => {
                parts.pop();
            }
            _ => parts.push(p),
        }
    }
    parts.join("/")
}

// ---------------------------------------------------------------------------
// The workloads.

/// A workload (or a section of prism-bench's output) of the document.
struct Section {
    key: &'static str,
    title: &'static str,
    about: &'static str,
    /// The card this source measured it on, if it did.
    card: fn(&Report) -> Option<String>,
    /// (one line for the summary, the full table).
    show: fn(&Report) -> (String, String),
}

fn main_card(key: &'static str) -> impl Fn(&Report) -> Option<String> {
    move |r| {
        r.workloads
            .iter()
            .any(|w| w.workload == key)
            .then(|| r.device.clone())
    }
}

const SECTIONS: [Section; 14] = [
    Section {
        key: "S1",
        title: "S1: 4 GiB pinned, 64 MiB chunks, one fma step",
        about: "`run_pinned` over one pinned buffer; bound = max(t_bidir, t_kernel).",
        card: |r| main_card("S1")(r),
        show: |r| show_main(r, "S1"),
    },
    Section {
        key: "S1c",
        title: "S1c: S1 made compute-bound",
        about: "S1 with an fma chain calibrated on the card so that t_kernel is about 1.5 × t_bidir (hence a step count per card).",
        card: |r| main_card("S1c")(r),
        show: |r| show_main(r, "S1c"),
    },
    Section {
        key: "S2",
        title: "S2: 1 GiB pinned, 1 MiB chunks",
        about: "Many small chunks: the per-chunk cost of the ring.",
        card: |r| main_card("S2")(r),
        show: |r| show_main(r, "S2"),
    },
    Section {
        key: "S3",
        title: "S3: 4096 separate 64 KiB pinned items",
        about: "`run_items_pinned`. \"CUDA C++ 3 streams\" copies item by item; the batched C++ baseline (where present) issues `cudaMemcpyBatchAsync` per direction.",
        card: |r| main_card("S3")(r),
        show: |r| show_main(r, "S3"),
    },
    Section {
        key: "S3 sweep",
        title: "S3 sweep: prism's chunk size and ring depth over 64 KiB items",
        about: "`run_items_pinned`, median ms per configuration.",
        card: |r| (!r.items_sweep.is_empty()).then(|| r.device.clone()),
        show: show_items_sweep,
    },
    Section {
        key: "S4",
        title: "S4: pageable `Vec`s in and out",
        about: "One shot: `run(&input, &mut output)` with `PipelineConfig::auto()`; its bound is max(t_bidir, the host alone copying the same bytes into and out of a ring of three 64 MiB buffers on the pool's threads). Repeated: `PinnedBuffer::register` of both vectors once, then `run_pinned` again and again; its bound is t_bidir.",
        card: |r| (!r.pageable.is_empty()).then(|| r.device.clone()),
        show: show_pageable,
    },
    Section {
        key: "S5",
        title: "S5: the step loop, 64 × `execute_iteration_pinned` of 64 MiB, then `flush`",
        about: "The same bytes as S1, one call per chunk.",
        card: |r| main_card("S5")(r),
        show: |r| show_main(r, "S5"),
    },
    Section {
        key: "S6",
        title: "S6: a 64 GiB stream generated and checked on the fly",
        about: "Generated on the host as it streams, one fma on the GPU, every output checked as it arrives; the bound is max(t_bidir, scaled from 256 MiB; the generator and the checker alone over the same data on the host's threads).",
        card: |r| r.stream.is_some().then(|| r.device.clone()),
        show: show_stream,
    },
    Section {
        key: "S7",
        title: "S7: S1 over every GPU (`MultiGpuPipeline`)",
        about: "4 GiB of portable pinned input, one fma step. \"bound/\" is the bound for that many GPUs (every GPU copying its share both ways at once, CUDA C++, no kernel; or GPU 0 alone) over the row's median; \"vs 1 GPU\" is prism on GPU 0 alone over the row's median.",
        card: |r| {
            r.multi
                .as_ref()
                .map(|m| format!("{} × {}", m.devices.len(), r.device))
        },
        show: show_multi,
    },
    Section {
        key: "S8",
        title: "S8: one small synchronous step (upload, fma kernel, download, wait)",
        about: "µs per step; the CUDA C++ baseline is one stream over pinned memory.",
        card: |r| (!r.steps.is_empty()).then(|| r.device.clone()),
        show: show_steps,
    },
    Section {
        key: "S9",
        title: "S9: a short run, 512 MiB pinned in 16 MiB chunks, fma + clamp",
        about: "With the chunk ramp off and on; with prism's timing events on, and off (as the benchmark runs the others).",
        card: |r| r.short.is_some().then(|| r.device.clone()),
        show: show_short,
    },
    Section {
        key: "S10",
        title: "S10: small iterations over resident data",
        about: "Three small kernels over a window of a device-resident array and a 4-byte read-back waited for every iteration; best of the rounds.",
        card: |r| r.iterations.is_some().then(|| r.device.clone()),
        show: show_iterations,
    },
    Section {
        key: "S11",
        title: "S11: one upload fanned out to several branches (`run_graph_pinned`)",
        about: "Each branch its own elementwise stage and its own pinned output; the bound is one upload and every branch's download issued together on two streams, no kernel.",
        card: |r| r.fanout.is_some().then(|| r.device.clone()),
        show: show_fanout,
    },
    Section {
        key: "auto",
        title: "`PipelineConfig::auto` against fixed configurations",
        about: "Median ms per configuration (chunk size × ring depth); \"best fixed / auto\" of 1.0 means auto is as fast as the best fixed one.",
        card: |r| (!r.auto.is_empty()).then(|| r.device.clone()),
        show: show_auto,
    },
];

/// Per card, the newest source that measured what `card` looks for
/// (cards in name order).
fn latest(sources: &[Source], card: impl Fn(&Report) -> Option<String>) -> Vec<(String, &Source)> {
    let mut best: BTreeMap<String, &Source> = BTreeMap::new();
    for s in sources.iter().filter(|s| !s.report.quick) {
        if let Some(c) = card(&s.report) {
            let e = best.entry(c).or_insert(s);
            if s.order() > e.order() {
                *e = s;
            }
        }
    }
    best.into_iter().collect()
}

// ---------------------------------------------------------------------------
// The document.

const PREAMBLE: &str = "\
# Benchmarks

<!-- Generated by `cargo xtask bench-doc` (xtask/src/bench_doc.rs) from the
results in docs/bench/; do not edit by hand. CI fails when it is stale
(`cargo xtask bench-doc --check`). -->

The latest figure of each workload on each card, made from the JSON that
`prism-bench` wrote (`results.json`), with the card, the driver, the date and
the file. Earlier runs are in the history of this file and of docs/bench/
in git, and in the closing notes of each issue (CHANGELOG.md).

prism against the baselines of `shared/BENCH-SPEC.md`, all in one process on
one GPU: sequential (one stream), hand-written CUDA C++ with 3 streams
(`crates/prism-bench/cuda/baselines.cu`, the classic multi-copy loop, launching
the same fma kernel), the same loop on plain cudarc (event tracking off), and
prism (`PipelineStageManager::run_pinned` for S1/S1c/S2, `run_items_pinned`
for S3, `execute_iteration_pinned` for S5). The bound is measured in the same
run: `t_bidir` (all H2D and all D2H copies of the workload's pieces issued
together on two streams, no kernel) and `t_kernel` (all kernels back to back
on device-resident data); bound = max(t_bidir, t_kernel); \"bound / measured\"
of 1.0 is perfect overlap, and above 1.0 means the bound, measured with the
workload's own pieces, is not tight. \"speed vs CUDA C++\" is the CUDA C++
3-stream time over the row's time.

How each is timed: the CUDA C++ baselines time themselves with CUDA events
around their whole loop (favourable to them: no host issue latency); cudarc
and prism are timed on the host from the first call until the last result is
on the host. Each case: one warm-up, then the file's repetitions (5 unless
said), median and min..max. Inputs are random; before every repetition ~4,000
output positions per workload (both ends of every piece and random ones) are
poisoned with NaN, and after it they are compared bit for bit with the CPU
reference (`checked_outputs` in the JSON counts them).

Command (on the GPU machine, from a bundle built by `cargo xtask gpu-test
--bundle bundle`): `./bundle/bin/prism-bench --out DIR` (or `cargo run
--release -p prism-bench --bin prism-bench -- --out DIR` where cargo and nvcc
are present; `--only S4` runs one workload, `--quick` shrinks every size 16x;
`--replot DIR/results.json` prints the tables and redraws the chart without
a GPU). To record a run: copy `DIR/results.json` to
`docs/bench/YYYY-MM-DD-<card>-results-runN.json` and run `cargo xtask
bench-doc`.

Different machines of one kind differ (the same card's t_bidir for 4 GiB
ranged from 85 to 120 ms between calls), so compare ratios within one file,
not figures across files.
";

/// The whole document.
fn render(sources: &[Source], pending: Option<&str>, base: &str) -> String {
    let link = |s: &Source| format!("[{0}]({base}/{0})", s.name);
    let mut used: BTreeSet<&str> = BTreeSet::new();
    let mut summary = String::new();
    let mut body = String::new();
    for sec in &SECTIONS {
        let picks = latest(sources, sec.card);
        if picks.is_empty() {
            continue;
        }
        let _ = write!(body, "\n## {}\n\n{}\n", sec.title, sec.about);
        for (card, s) in &picks {
            used.insert(&s.name);
            let (line, table) = (sec.show)(&s.report);
            let _ = writeln!(
                summary,
                "| {} | {card} | {line} | {} | {} |",
                sec.key,
                s.date_text(),
                link(s)
            );
            let _ = write!(
                body,
                "\n**{card}**, {}: {}{}.\n\n{table}",
                s.date_text(),
                link(s),
                if s.report.reps == 5 || s.report.reps == 0 {
                    String::new()
                } else {
                    format!(", {} repetitions", s.report.reps)
                }
            );
        }
    }
    let mut out = String::from(PREAMBLE);
    out.push_str("\n## Latest figures\n\n");
    if pending.is_some() {
        out.push_str("Some workloads have newer figures that no results file holds yet: they are\nlisted at the end, with the logs they come from.\n\n");
    }
    out.push_str("| workload | card | prism | date | results |\n| --- | --- | --- | --- | --- |\n");
    out.push_str(&summary);
    out.push_str(&body);
    out.push_str("\n## The results files\n\n");
    out.push_str("| file | card | driver | CUDA | PCIe link | date | commit | used |\n");
    out.push_str("| --- | --- | --- | --- | --- | --- | --- | --- |\n");
    let known = |v: &Option<String>| v.clone().unwrap_or_else(|| "not recorded".into());
    for s in sources {
        let r = &s.report;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            link(s),
            match &r.multi {
                Some(m) if m.devices.len() > 1 => format!("{} × {}", m.devices.len(), r.device),
                _ => r.device.clone(),
            },
            known(&r.driver_version),
            r.driver_cuda_version,
            known(&r.pcie_link),
            s.date_text(),
            known(&r.git_commit),
            if r.quick {
                "no (`--quick`)"
            } else if used.contains(s.name.as_str()) {
                "yes"
            } else {
                "no (newer ones replace it)"
            }
        );
    }
    if let Some(p) = pending {
        out.push('\n');
        out.push_str(p.trim_end());
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------
// One table per section, as prism-bench prints them.

fn ratio(x: f64) -> String {
    format!("{x:.3}")
}

fn speed(x: f64) -> String {
    format!("{x:.2}x")
}

fn show_main(r: &Report, key: &str) -> (String, String) {
    let Some(w) = r.workloads.iter().find(|w| w.workload == key) else {
        return (String::new(), String::new());
    };
    let prism = w.cases.iter().find(|c| c.implementation == "prism");
    let line = match (key, prism) {
        ("S3", Some(p)) => {
            let mut l = format!(
                "{:.2} ms, {} the per-item CUDA C++",
                p.median_ms,
                p.speed_vs_cxx.map_or("-".into(), speed)
            );
            if let Some(b) = w
                .cases
                .iter()
                .find(|c| c.implementation.contains("batched"))
            {
                let _ = write!(l, "; batched CUDA C++ {:.2} ms", b.median_ms);
            }
            l
        }
        (_, Some(p)) => format!(
            "{} of the bound, {} the CUDA C++",
            ratio(p.bound_over_measured),
            p.speed_vs_cxx.map_or("-".into(), speed)
        ),
        (_, None) => "no prism row".into(),
    };
    let mut t = format!(
        "{} MiB, {} KiB {}, {} fma steps; bound: t_bidir {:.2} ms, t_kernel {:.2} ms.\n\n",
        w.total_mib,
        w.piece_kib,
        if w.items { "items" } else { "chunks" },
        w.fma_iters,
        w.t_bidir_ms,
        w.t_kernel_ms
    );
    t.push_str("| implementation | median ms | min..max ms | GB/s (both ways) | bound / measured | speed vs CUDA C++ |\n| --- | --- | --- | --- | --- | --- |\n");
    for c in &w.cases {
        let _ = writeln!(
            t,
            "| {} | {:.2} | {:.2}..{:.2} | {:.1} | {} | {} |",
            c.implementation,
            c.median_ms,
            c.min_ms,
            c.max_ms,
            c.gbps,
            ratio(c.bound_over_measured),
            c.speed_vs_cxx.map_or("-".into(), speed)
        );
    }
    (line, t)
}

fn show_items_sweep(r: &Report) -> (String, String) {
    let best = r
        .items_sweep
        .iter()
        .min_by(|a, b| a.ms.total_cmp(&b.ms))
        .map_or(String::new(), |b| {
            format!("fastest {} MiB × {}: {:.2} ms", b.chunk_mib, b.slots, b.ms)
        });
    let mut t = String::from("| chunk MiB | slots | median ms |\n| --- | --- | --- |\n");
    for w in &r.items_sweep {
        let _ = writeln!(t, "| {} | {} | {:.2} |", w.chunk_mib, w.slots, w.ms);
    }
    (best, t)
}

fn mib_text(mib: usize) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

fn show_pageable(r: &Report) -> (String, String) {
    let one: Vec<String> = r
        .pageable
        .iter()
        .map(|p| format!("{} ({})", ratio(p.bound_over_measured), mib_text(p.mib)))
        .collect();
    let rep: Vec<String> = r
        .pageable
        .iter()
        .filter_map(|p| {
            p.repeated
                .as_ref()
                .map(|x| format!("{} ({})", ratio(x.run_over_bidir), mib_text(p.mib)))
        })
        .collect();
    let mut line = format!("one shot {} of the staging bound", one.join(", "));
    if !rep.is_empty() {
        let _ = write!(line, "; registered {} of t_bidir", rep.join(", "));
    }
    let mut t = String::from("One shot:\n\n| size | t_bidir ms | host staging alone ms (threads) | staging bound ms | prism ms | bound / measured |\n| --- | --- | --- | --- | --- | --- |\n");
    for p in &r.pageable {
        let _ = writeln!(
            t,
            "| {} MiB | {:.1} | {:.1} ({}) | {:.1} | {:.1} | {} |",
            p.mib,
            p.t_bidir_ms,
            p.t_staging_ms,
            p.threads,
            p.bound_ms,
            p.prism_ms,
            ratio(p.bound_over_measured)
        );
    }
    if r.pageable.iter().any(|p| p.repeated.is_some()) {
        t.push_str("\nRepeated (registered once):\n\n| size | t_bidir ms | register ms | first run ms | later runs ms (median) | t_bidir / later | unregister ms |\n| --- | --- | --- | --- | --- | --- | --- |\n");
        for p in &r.pageable {
            if let Some(x) = &p.repeated {
                let _ = writeln!(
                    t,
                    "| {} MiB | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} |",
                    p.mib,
                    p.t_bidir_ms,
                    x.register_ms,
                    x.first_run_ms,
                    x.run_ms,
                    ratio(x.run_over_bidir),
                    x.unregister_ms
                );
            }
        }
    }
    if r.pageable.iter().any(|p| !p.sweep.is_empty()) {
        t.push_str("\nOne-shot sweep (per run: median wall; host time in staging copies and blocked on the GPU):\n\n| size | chunk MiB | slots | ms | staging bound / ms | host copies ms | host waits ms |\n| --- | --- | --- | --- | --- | --- | --- |\n");
        for p in &r.pageable {
            for w in &p.sweep {
                let (chunk, slots) = if w.chunk_mib == 0 {
                    ("auto".to_owned(), String::new())
                } else {
                    (w.chunk_mib.to_string(), w.slots.to_string())
                };
                let _ = writeln!(
                    t,
                    "| {} MiB | {chunk} | {slots} | {:.1} | {} | {:.1} | {:.1} |",
                    p.mib,
                    w.ms,
                    ratio(p.bound_ms / w.ms),
                    w.host_copy_ms,
                    w.host_wait_ms
                );
            }
        }
    }
    (line, t)
}

fn show_stream(r: &Report) -> (String, String) {
    let Some(s) = &r.stream else {
        return (String::new(), String::new());
    };
    let line = format!(
        "{} of the bound, peak RSS {:.0} MiB",
        ratio(s.bound_over_measured),
        s.peak_rss_mib
    );
    let t = format!(
        "{:.0} GiB in {} MiB chunks.\n\n| t_bidir ms (scaled) | generator + checker alone ms | bound ms | prism ms | bound / measured | outputs checked | peak RSS MiB |\n| --- | --- | --- | --- | --- | --- | --- |\n| {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {:.0} |\n",
        s.gib,
        s.chunk_mib,
        s.t_bidir_ms,
        s.t_host_ms,
        s.bound_ms,
        s.prism_ms,
        ratio(s.bound_over_measured),
        s.checked_elements,
        s.peak_rss_mib
    );
    (line, t)
}

fn show_multi(r: &Report) -> (String, String) {
    let Some(m) = &r.multi else {
        return (String::new(), String::new());
    };
    let prism: Vec<String> = m
        .rows
        .iter()
        .filter(|x| x.gpus > 1 && x.what.starts_with("prism"))
        .map(|x| {
            format!(
                "{} of the joint bound, {} one GPU ({})",
                ratio(x.bound_over_measured),
                speed(x.speedup_over_one_gpu),
                x.what
                    .rsplit_once('(')
                    .map_or(x.what.as_str(), |(_, c)| c.trim_end_matches(')'))
            )
        })
        .collect();
    let per_gpu: Vec<String> = m
        .joint_per_gpu_ms
        .iter()
        .map(|v| format!("{v:.2}"))
        .collect();
    let mut t = format!(
        "{} MiB; {}. Bound: GPU 0 alone t_bidir {:.2} ms; every GPU at once, its share each, {:.2} ms (per GPU {}).\n\n",
        m.total_mib,
        m.devices.join("; "),
        m.single_bidir_ms,
        m.joint_bidir_ms,
        per_gpu.join(", ")
    );
    t.push_str("| implementation | GPUs | median ms | min..max ms | GB/s both ways | bound/ | vs 1 GPU | chunks per GPU |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for x in &m.rows {
        let chunks: Vec<String> = x.chunks_per_gpu.iter().map(u64::to_string).collect();
        let _ = writeln!(
            t,
            "| {} | {} | {:.2} | {:.2}..{:.2} | {:.1} | {} | {:.2} | {} |",
            x.what,
            x.gpus,
            x.median_ms,
            x.min_ms,
            x.max_ms,
            x.gbps,
            ratio(x.bound_over_measured),
            x.speedup_over_one_gpu,
            chunks.join(", ")
        );
    }
    (prism.join("; "), t)
}

fn show_steps(r: &Report) -> (String, String) {
    let pinned: Vec<String> = r
        .steps
        .iter()
        .map(|s| format!("{} ({} KiB)", speed(s.prism_pinned_over_cxx), s.kib))
        .collect();
    let line = format!("pinned step {} the CUDA C++ time", pinned.join(", "));
    let mut t = String::from("| size | CUDA C++ µs | CUDA C++ graph µs | prism pinned µs | prism pinned / C++ | prism pageable slice to `Vec` µs | prism pageable / C++ |\n| --- | --- | --- | --- | --- | --- | --- |\n");
    for s in &r.steps {
        let _ = writeln!(
            t,
            "| {} KiB | {:.1} | {:.1} | {:.1} | {} | {:.1} | {} |",
            s.kib,
            s.cxx_us,
            s.cxx_graph_us,
            s.prism_pinned_us,
            speed(s.prism_pinned_over_cxx),
            s.prism_us,
            speed(s.prism_over_cxx)
        );
    }
    (line, t)
}

fn show_short(r: &Report) -> (String, String) {
    let Some(s) = &r.short else {
        return (String::new(), String::new());
    };
    let ramp = |on: bool| if on { "on" } else { "off" };
    let over = |ms: f64| ratio(s.t_bidir_ms / ms);
    let line = if s.untimed.is_empty() {
        let v: Vec<String> = s
            .runs
            .iter()
            .map(|(on, ms, _, _)| format!("{} (ramp {})", over(*ms), ramp(*on)))
            .collect();
        format!("{} of t_bidir, timing on", v.join(", "))
    } else {
        let v: Vec<String> = s
            .untimed
            .iter()
            .map(|(on, ms)| format!("{} (ramp {})", over(*ms), ramp(*on)))
            .collect();
        format!("{} of t_bidir", v.join(", "))
    };
    let mut t = format!(
        "{} MiB in {} MiB chunks; t_bidir {:.2} ms.\n\n| chunk ramp | timing events | chunks | median ms | t_bidir / measured |\n| --- | --- | --- | --- | --- |\n",
        s.mib, s.chunk_mib, s.t_bidir_ms
    );
    for (on, ms, chunks, _) in &s.runs {
        let _ = writeln!(
            t,
            "| {} | on | {chunks} | {ms:.2} | {} |",
            ramp(*on),
            over(*ms)
        );
    }
    for (on, ms) in &s.untimed {
        let _ = writeln!(t, "| {} | off | | {ms:.2} | {} |", ramp(*on), over(*ms));
    }
    (line, t)
}

fn show_iterations(r: &Report) -> (String, String) {
    let Some(it) = &r.iterations else {
        return (String::new(), String::new());
    };
    let line = it
        .cases
        .iter()
        .find(|c| c.implementation == "prism graph replay")
        .map_or("no prism graph replay row".into(), |c| {
            format!(
                "graph replay {:.2} µs, {} the CUDA C++ graph replay's time",
                c.best_us,
                speed(c.over_cxx_graph)
            )
        });
    let mut t = format!(
        "{} MiB resident, a {} KiB window; {} iterations after {} of warm-up, best of {}.\n\n| implementation | µs per iteration | / CUDA C++ graph replay | rounds (µs) | accumulator |\n| --- | --- | --- | --- | --- |\n",
        it.resident_mib,
        it.window * 4 / 1024,
        it.iters,
        it.warmup,
        it.rounds
    );
    for c in &it.cases {
        let runs: Vec<String> = c.runs_us.iter().map(|u| format!("{u:.2}")).collect();
        let _ = writeln!(
            t,
            "| {} | {:.2} | {} | {} | {} |",
            c.implementation,
            c.best_us,
            speed(c.over_cxx_graph),
            runs.join(" / "),
            if c.acc_bit_exact {
                "bit for bit the CPU's"
            } else {
                "within the tolerance"
            }
        );
    }
    (line, t)
}

fn show_fanout(r: &Report) -> (String, String) {
    let Some(f) = &r.fanout else {
        return (String::new(), String::new());
    };
    let (lo, hi) = f
        .rows
        .iter()
        .map(|x| x.bound_over_measured)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    let counts: BTreeSet<usize> = f.rows.iter().map(|x| x.branches).collect();
    let counts: Vec<String> = counts.iter().map(usize::to_string).collect();
    let line = if f.rows.is_empty() {
        "no rows".into()
    } else {
        format!(
            "{}–{} of the bound ({} branches)",
            ratio(lo),
            ratio(hi),
            counts.join(" and ")
        )
    };
    let mut t = format!(
        "{} MiB uploaded once; branches: {}; median of {}.\n\n| branches | chunk MiB | chunks | bound ms | prism ms | min..max ms | bound / measured | GB/s moved | outputs checked |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        f.mib,
        f.branches.join(", "),
        f.reps
    );
    for x in &f.rows {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {:.2} | {:.2} | {:.2}..{:.2} | {} | {:.1} | {} |",
            x.branches,
            x.chunk_mib,
            x.chunks,
            x.bound_ms,
            x.prism_ms,
            x.min_ms,
            x.max_ms,
            ratio(x.bound_over_measured),
            x.gbps,
            x.checked_elements
        );
    }
    if let Some(c) = &f.concurrency {
        let _ = write!(
            t,
            "\nConcurrency: {} compute-bound branches (fma, {} steps) over {} MiB in {} KiB chunks: one lane {:.2} ms, lanes of their own {:.2} ms ({} one lane's speed).\n",
            c.branches,
            c.iters,
            c.mib,
            c.chunk_kib,
            c.one_lane_ms,
            c.concurrent_ms,
            speed(c.one_lane_ms / c.concurrent_ms)
        );
    }
    (line, t)
}

fn show_auto(r: &Report) -> (String, String) {
    let v: Vec<String> = r
        .auto
        .iter()
        .map(|a| {
            let name = a.workload.split(',').next().unwrap_or(&a.workload);
            format!("{name} {}", ratio(a.auto_vs_best))
        })
        .collect();
    let line = format!("best fixed / auto: {}", v.join(", "));
    let mut head: Vec<String> = Vec::new();
    for a in &r.auto {
        for f in &a.fixed {
            let h = format!("{} MiB x{}", f.0, f.1);
            if !head.contains(&h) {
                head.push(h);
            }
        }
    }
    let mut t = format!(
        "| workload | {} | auto (chose) | best fixed / auto |\n|{}\n",
        head.join(" | "),
        " --- |".repeat(head.len() + 3)
    );
    for a in &r.auto {
        let cells: Vec<String> = head
            .iter()
            .map(|h| {
                a.fixed
                    .iter()
                    .find(|f| format!("{} MiB x{}", f.0, f.1) == *h)
                    .map_or(String::new(), |f| format!("{:.2}", f.2))
            })
            .collect();
        let _ = writeln!(
            t,
            "| {} | {} | {:.2} ({:.0} MiB x{}) | {} |",
            a.workload,
            cells.join(" | "),
            a.auto_ms,
            a.auto_chunk_mib,
            a.auto_slots,
            ratio(a.auto_vs_best)
        );
    }
    (line, t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A results file with S1 only, prism at `ratio` of the bound.
    fn s1(device: &str, date_utc: Option<&str>, ratio: f64) -> String {
        let date = date_utc.map_or(String::new(), |d| format!(r#""date_utc": "{d}","#));
        format!(
            r#"{{"device": "{device}", "driver_cuda_version": "13.0", {date}
            "driver_version": "580.159.04", "pcie_link": "Gen5 x16", "git_commit": "abc1234",
            "quick": false, "reps": 5, "workloads": [{{"workload": "S1", "total_mib": 4096,
            "piece_kib": 65536, "items": false, "fma_iters": 1, "t_bidir_ms": 84.0,
            "t_kernel_ms": 2.0, "bound_ms": 84.0, "cases": [{{"workload": "S1",
            "implementation": "prism", "median_ms": 86.0, "min_ms": 85.0, "max_ms": 87.0,
            "gbps": 99.9, "bound_over_measured": {ratio}, "speed_vs_cxx": 1.02,
            "checked_outputs": 4000}}]}}]}}"#
        )
    }

    /// The oldest format: no provenance, no sections after the main table.
    const OLD: &str = r#"{"device": "NVIDIA H100 80GB HBM3", "driver_cuda_version": "13.0",
        "quick": false, "reps": 5, "workloads": [{"workload": "S1", "total_mib": 4096,
        "piece_kib": 65536, "items": false, "fma_iters": 1, "t_bidir_ms": 90.0,
        "t_kernel_ms": 2.0, "bound_ms": 90.0, "cases": [{"workload": "S1",
        "implementation": "prism", "median_ms": 91.0, "min_ms": 90.5, "max_ms": 92.0,
        "gbps": 94.4, "bound_over_measured": 0.989, "speed_vs_cxx": 1.05,
        "checked_outputs": 4000}]}]}"#;

    fn source(name: &str, text: &str) -> Source {
        parse(name, text).expect("parses")
    }

    #[test]
    fn latest_is_per_card_by_date_then_run() {
        let sources = vec![
            source(
                "2026-11-27-h200-results-run31.json",
                &s1("NVIDIA H200", None, 0.91),
            ),
            source(
                "2026-11-27-h200-results-run9.json",
                &s1("NVIDIA H200", None, 0.92),
            ),
            source(
                "h200-later.json",
                &s1("NVIDIA H200", Some("2026-12-07T16:21:05Z"), 0.93),
            ),
            source(
                "2026-11-27-h100-results-run37.json",
                &s1("NVIDIA H100", None, 0.94),
            ),
            source(
                "2026-11-27-h100-results-run40.json",
                &s1("NVIDIA H100", None, 0.95),
            ),
        ];
        let picks = latest(&sources, main_card("S1"));
        let names: Vec<(&str, &str)> = picks
            .iter()
            .map(|(c, s)| (c.as_str(), s.name.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("NVIDIA H100", "2026-11-27-h100-results-run40.json"),
                ("NVIDIA H200", "h200-later.json"),
            ]
        );
        // A card that never ran S3 has no S3 figure.
        assert!(latest(&sources, main_card("S3")).is_empty());
    }

    #[test]
    fn quick_runs_are_not_figures() {
        let quick = s1("NVIDIA H200", Some("2026-12-08T00:00:00Z"), 0.5)
            .replace(r#""quick": false"#, r#""quick": true"#);
        let sources = vec![
            source(
                "2026-11-27-h200-results-run31.json",
                &s1("NVIDIA H200", None, 0.91),
            ),
            source("2026-12-08-h200-quick.json", &quick),
        ];
        let picks = latest(&sources, main_card("S1"));
        assert_eq!(picks.len(), 1);
        assert_eq!(picks[0].1.name, "2026-11-27-h200-results-run31.json");
        let doc = render(&sources, None, "bench");
        assert!(doc.contains("no (`--quick`)"));
    }

    #[test]
    fn old_results_without_provenance_load_and_say_so() {
        let s = source("2026-11-27-h100-results-run8.json", OLD);
        assert_eq!(s.date, "2026-11-27");
        assert_eq!(s.run, Some(8));
        assert_eq!(s.report.driver_version, None);
        let doc = render(&[s], None, "bench");
        assert!(doc.contains(
            "| [2026-11-27-h100-results-run8.json](bench/2026-11-27-h100-results-run8.json) | NVIDIA H100 80GB HBM3 | not recorded | 13.0 | not recorded | 2026-11-27 | not recorded | yes |"
        ));
        assert!(doc.contains(
            "| S1 | NVIDIA H100 80GB HBM3 | 0.989 of the bound, 1.05x the CUDA C++ | 2026-11-27 |"
        ));
        // Without a date in the file or its name there is no order.
        assert!(parse("h100-results.json", OLD).is_err());
        assert!(parse("x.json", r#"{"reps": 5}"#).is_err());
    }

    #[test]
    fn new_results_show_their_provenance() {
        let s = source(
            "x.json",
            &s1("NVIDIA H100 80GB HBM3", Some("2026-12-09T08:05:00Z"), 0.99),
        );
        let doc = render(
            &[s],
            Some("## Figures not yet in JSON\n\ntext\n\n"),
            "bench",
        );
        assert!(doc.contains(
            "| NVIDIA H100 80GB HBM3 | 580.159.04 | 13.0 | Gen5 x16 | 2026-12-09 08:05 UTC | abc1234 | yes |"
        ));
        assert!(doc.ends_with("## Figures not yet in JSON\n\ntext\n"));
    }

    #[test]
    fn check_finds_drift() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-doc-{}", std::process::id()));
        let bench = dir.join("bench");
        std::fs::create_dir_all(&bench).expect("temp dir");
        std::fs::write(bench.join("2026-11-27-h100-results-run8.json"), OLD).expect("write");
        let doc = dir.join("BENCHMARKS.md");
        let text = generate(&bench, &doc).expect("generates");
        assert!(text.contains("(bench/2026-11-27-h100-results-run8.json)"));
        std::fs::write(&doc, &text).expect("write");
        assert!(check_doc(&doc, &generate(&bench, &doc).expect("generates")).is_ok());
        // A hand edit is drift.
        std::fs::write(&doc, text.replace("0.989", "0.999")).expect("write");
        let err = check_doc(&doc, &generate(&bench, &doc).expect("generates"))
            .expect_err("an edited figure is found");
        assert!(err.contains("cargo xtask bench-doc"), "{err}");
        // So is a new results file the document does not show yet.
        std::fs::write(&doc, &text).expect("write");
        std::fs::write(
            bench.join("2026-12-09-h100-results-run70.json"),
            s1("NVIDIA H100 80GB HBM3", None, 0.97),
        )
        .expect("write");
        assert!(check_doc(&doc, &generate(&bench, &doc).expect("generates")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pending_links_are_rebased_to_the_document() {
        let text = "[log](../gpu-runs/a.md), [b](b.json), [w](https://x.org/a), [s](#top)";
        assert_eq!(
            rebase_links(text, "bench"),
            "[log](gpu-runs/a.md), [b](bench/b.json), [w](https://x.org/a), [s](#top)"
        );
        assert_eq!(normalize("../x/../../y"), "../../y");
    }

    #[test]
    fn links_are_relative_to_the_document() {
        let root = util::root();
        assert_eq!(
            link_base(&root.join("docs"), &root.join("docs/bench")),
            "bench"
        );
        assert_eq!(
            link_base(&root.join("docs"), &root.join("target/x")),
            "../target/x"
        );
    }

    #[test]
    fn the_committed_results_make_the_committed_document() {
        // What CI's `--check` runs, here so that `cargo test` finds it too.
        let root = util::root();
        let text = generate(&root.join(FROM), &root.join(DOC)).expect("generates");
        assert!(check_doc(&root.join(DOC), &text).is_ok());
    }
}
