//! prism's NVTX ranges, counted by name by an NVTX injection library
//! (`tests/nvtx/nvtx_count.c`), the stand-in for Nsight Systems.
//!
//! NVTX loads its tool once per process, at the first range, from
//! `NVTX_INJECTION64_PATH`; so each check runs its work in a child process
//! (this test binary again, test `nvtx_child`) with the library injected.
//! The child writes what it expects (from its own stats: chunks per run)
//! to one file, the library its counts to another; the parent compares
//! them name by name and checks every push was popped on its thread.
//!
//! The library is `$PRISM_NVTX_COUNT_SO` (the GPU bundle's), else compiled
//! here with `$CC` or `cc`; without a C compiler the host check is skipped
//! with a note (on a GPU run, with `PRISM_REQUIRE_GPU=1`, it fails).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use prism_buffer::GpuTripleBufferExt;
use prism_pipeline::{
    from_iter, sink_fn, Backend, Clamp, Fma, GpuPipelineExt, HostFn, MultiGpuPipeline,
    PipelineConfig, PipelineStageManager, StageError,
};
use prism_stream::nvtx::Range;
use prism_stream::{HostAllocFlags, Launch, ManagedGpuContext, PinnedBuffer};
use prism_testing::{gpu_or_skip, gpu_required, random_f32, under_sanitizer};

const FMA: Fma = Fma {
    a: 1.0001,
    b: 0.5,
    iters: 1,
};
const CLAMP: Clamp = Clamp { lo: -1.0, hi: 1.0 };
/// The stages of every pipeline here (and so, per chunk, their ranges).
const STAGES: [&str; 2] = ["fma", "clamp"];

/// Range names whose count depends on timing: checked for balance only.
const UNCOUNTED: [&str; 1] = ["wait for the GPU"];

/// Why the counter library is not available.
#[derive(Debug, Clone)]
enum NoCounter {
    /// No C compiler here (nothing prism can do about it).
    NoCompiler(String),
    /// Something that should work did not.
    Failed(String),
}

/// The injection library: the bundle's, or compiled here once per process.
fn counter() -> Result<PathBuf, NoCounter> {
    static SO: OnceLock<Result<PathBuf, NoCounter>> = OnceLock::new();
    SO.get_or_init(|| {
        if let Some(p) = std::env::var_os("PRISM_NVTX_COUNT_SO") {
            let p = PathBuf::from(p);
            return if p.is_file() {
                Ok(p)
            } else {
                Err(NoCounter::Failed(format!(
                    "PRISM_NVTX_COUNT_SO={} is not a file",
                    p.display()
                )))
            };
        }
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let src = here.join("nvtx/nvtx_count.c");
        let include = here.join("../crates/prism-stream/third_party/nvtx");
        if !src.is_file() {
            return Err(NoCounter::Failed(format!(
                "{} is missing (and PRISM_NVTX_COUNT_SO is not set)",
                src.display()
            )));
        }
        // Built under a name of this process's own, then renamed into
        // place (atomic: a test process running at the same time loads
        // either the old file or the new one, both whole).
        let dir = scratch();
        let built = dir.join(format!("libprism_nvtx_count.{}.so", std::process::id()));
        let out = dir.join("libprism_nvtx_count.so");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let made = Command::new(&cc)
            .args(["-shared", "-fPIC", "-O2", "-I"])
            .arg(&include)
            .arg(&src)
            .arg("-o")
            .arg(&built)
            .arg("-lpthread")
            .output();
        match made {
            Err(e) => Err(NoCounter::NoCompiler(format!("`{cc}` did not run: {e}"))),
            Ok(o) if !o.status.success() => Err(NoCounter::Failed(format!(
                "`{cc}` failed on {}:\n{}",
                src.display(),
                String::from_utf8_lossy(&o.stderr)
            ))),
            Ok(_) => std::fs::rename(&built, &out)
                .map(|()| out)
                .map_err(|e| NoCounter::Failed(format!("rename {}: {e}", built.display()))),
        }
    })
    .clone()
}

/// Where the library and the count files go: cargo's scratch folder for
/// integration tests, or (a test binary moved to another machine) the
/// system's temporary folder.
fn scratch() -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let base = if target.is_dir() {
        target.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join("prism-nvtx");
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// What the library counted: the totals and each range of domain `prism`.
#[derive(Debug, Default)]
struct Counts {
    totals: BTreeMap<String, u64>,
    prism: BTreeMap<String, u64>,
    /// Ranges outside the `prism` domain ("domain\tname").
    other: Vec<String>,
}

fn parse_counts(text: &str) -> Counts {
    let mut c = Counts::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        match f.as_slice() {
            ["range", "prism", name, n] => {
                c.prism
                    .insert((*name).to_owned(), n.parse().expect("count"));
            }
            ["range", domain, name, _] => c.other.push(format!("{domain}\t{name}")),
            [key, n] => {
                c.totals
                    .insert((*key).to_owned(), n.parse().expect("count"));
            }
            _ => panic!("unexpected line in the counts: {line:?}"),
        }
    }
    c
}

/// Runs `nvtx_child` in `mode` with the library injected; returns what the
/// child expected and what the library counted.
fn in_child(mode: &str, so: &Path) -> (BTreeMap<String, Option<u64>>, Counts) {
    let dir = scratch();
    let pid = std::process::id();
    let counts = dir.join(format!("{mode}.{pid}.counts.tsv"));
    let expect = dir.join(format!("{mode}.{pid}.expect.tsv"));
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new(exe)
        .args(["--exact", "nvtx_child", "--nocapture", "--test-threads=1"])
        .env("NVTX_INJECTION64_PATH", so)
        .env("PRISM_NVTX_COUNT_OUT", &counts)
        .env("PRISM_NVTX_EXPECT_OUT", &expect)
        .env("PRISM_NVTX_CHILD", mode)
        .output()
        .expect("run the child");
    let log = format!(
        "child stdout:\n{}\nchild stderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the {mode} child failed\n{log}");
    let expected = std::fs::read_to_string(&expect)
        .unwrap_or_else(|e| panic!("{}: {e}\n{log}", expect.display()));
    let counted = std::fs::read_to_string(&counts).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (did NVTX load the library?)\n{log}",
            counts.display()
        )
    });
    let _ = std::fs::remove_file(&expect);
    let _ = std::fs::remove_file(&counts);
    let mut want = BTreeMap::new();
    for line in expected.lines() {
        let (name, n) = line.split_once('\t').expect("name\\tcount");
        let n = (n != "-").then(|| n.parse().expect("count"));
        want.insert(name.to_owned(), n);
    }
    (want, parse_counts(&counted))
}

/// Every push popped on its own thread, every expected range counted
/// exactly, and no other range in the prism domain.
fn check(mode: &str, want: &BTreeMap<String, Option<u64>>, got: &Counts) {
    let total = |k: &str| got.totals.get(k).copied().unwrap_or(u64::MAX);
    assert!(total("pushes") > 0, "{mode}: no range reached the library");
    assert_eq!(total("pushes"), total("pops"), "{mode}: {:?}", got.totals);
    assert_eq!(total("bad_pops"), 0, "{mode}: {:?}", got.totals);
    assert_eq!(total("open"), 0, "{mode}: {:?}", got.totals);
    if !got.other.is_empty() {
        // Another library's NVTX ranges: prism's would be in "prism", and
        // missing there they fail below.
        println!("{mode}: ranges outside the prism domain: {:?}", got.other);
    }
    let mut wrong = Vec::new();
    for (name, &n) in want {
        let Some(n) = n else { continue };
        let c = got.prism.get(name).copied().unwrap_or(0);
        if c != n {
            wrong.push(format!("{name}: counted {c}, expected {n}"));
        }
    }
    for (name, &c) in &got.prism {
        if !want.contains_key(name) && !UNCOUNTED.contains(&name.as_str()) {
            wrong.push(format!("{name}: counted {c}, expected none"));
        }
    }
    assert!(wrong.is_empty(), "{mode}:\n{}", wrong.join("\n"));
    println!(
        "{mode}: {} ranges, {} names, all as expected; balanced on {} threads",
        total("pushes"),
        got.prism.len(),
        total("threads")
    );
}

/// The body of the child process (a no-op test unless `PRISM_NVTX_CHILD`
/// says which work to do).
#[test]
fn nvtx_child() {
    let Ok(mode) = std::env::var("PRISM_NVTX_CHILD") else {
        return;
    };
    let mut want = Expect::default();
    match mode.as_str() {
        "host" => host_work(&mut want),
        "gpu" => gpu_work(&mut want),
        other => panic!("unknown PRISM_NVTX_CHILD {other:?}"),
    }
    let path = std::env::var("PRISM_NVTX_EXPECT_OUT").expect("PRISM_NVTX_EXPECT_OUT");
    let text: String = want
        .0
        .iter()
        .map(|(k, v)| match v {
            Some(n) => format!("{k}\t{n}\n"),
            None => format!("{k}\t-\n"),
        })
        .collect();
    std::fs::write(path, text).expect("write the expected counts");
}

/// Ranges the child expects, by name.
#[derive(Debug, Default)]
struct Expect(BTreeMap<String, Option<u64>>);

impl Expect {
    fn add(&mut self, name: &str, n: u64) {
        *self.0.entry(name.to_owned()).or_default().get_or_insert(0) += n;
    }
    /// A range whose count depends on timing (checked for balance only).
    fn uncounted(&mut self, name: &str) {
        self.0.insert(name.to_owned(), None);
    }
    /// `chunks` chunks, each through both stages.
    fn stages(&mut self, chunks: u64) {
        for s in STAGES {
            self.add(s, chunks);
        }
    }
    /// `chunks` chunks through the GPU engine: upload, stages, download
    /// (and, from pageable memory, a staging copy each way).
    fn gpu_chunks(&mut self, chunks: u64, staged: bool) {
        self.add("upload", chunks);
        self.stages(chunks);
        self.add("download", chunks);
        if staged {
            self.add("staging copy in", chunks);
            self.add("staging copy out", chunks);
        }
    }
}

fn pipeline(p: &mut PipelineStageManager<f32>) {
    p.add_stage(FMA);
    p.add_stage(CLAMP);
}

/// Chunks `p` ran since `before`.
fn chunks_since(p: &PipelineStageManager<f32>, before: u64) -> u64 {
    p.get_stats().chunks - before
}

/// Every run mode of the host backend, a failing run, an early error, and
/// ranges of the user's own on several threads.
fn host_work(want: &mut Expect) {
    let config = PipelineConfig {
        chunk_bytes: 64 << 10,
        host_threads: 2,
        ..PipelineConfig::default()
    };
    let mut p = PipelineStageManager::<f32>::new(Backend::Host, config.clone()).unwrap();
    pipeline(&mut p);
    let input = random_f32(7, 100_003);
    let mut output = vec![0.0; p.total_output_len(input.len())];

    let c = p.get_stats().chunks;
    p.run(&input, &mut output).unwrap();
    want.add("run", 1);
    let n = chunks_since(&p, c);
    assert_eq!(n, 7, "100,003 elements in chunks of 16,384");
    want.stages(n);

    let c = p.get_stats().chunks;
    let pieces: Vec<&[f32]> = input.chunks(10_000).collect();
    p.run_stream(
        from_iter(pieces),
        sink_fn(|_, _: &[f32]| Ok::<_, StageError>(())),
    )
    .unwrap();
    want.add("run_stream", 1);
    want.stages(chunks_since(&p, c));

    let c = p.get_stats().chunks;
    let mut outs: Vec<Vec<f32>> = [100, 5_000, 16_384, 1]
        .iter()
        .map(|&n| vec![0.0; n])
        .collect();
    let items: Vec<(&[f32], &mut [f32])> = outs
        .iter_mut()
        .map(|o| (&input[..o.len()], o.as_mut_slice()))
        .collect();
    assert_eq!(p.run_items(items).unwrap(), 4);
    want.add("run_items", 1);
    want.stages(chunks_since(&p, c));

    let c = p.get_stats().chunks;
    for k in 0..3 {
        p.execute_iteration(&input[k * 1000..(k + 1) * 1000])
            .unwrap();
        want.add("execute_iteration", 1);
    }
    p.flush().unwrap();
    want.add("flush", 1);
    p.execute_iteration_blocking(&input[..500]).unwrap();
    want.add("execute_iteration_blocking", 1);
    want.stages(chunks_since(&p, c));

    // An early error (an output of the wrong length): the range still pops.
    let mut short = vec![0.0; 10];
    assert!(p.run(&input, &mut short).is_err());
    want.add("run", 1);

    // A stage that fails on its third chunk: the run stops, chunks in
    // flight on other threads finish or are skipped; how many ran is not
    // fixed, but every range they pushed is popped.
    let mut bad = PipelineStageManager::<f32>::new(Backend::Host, config).unwrap();
    bad.add_stage(HostFn::new("fails_on_the_third_chunk", true, {
        move |i: &[f32], o: &mut [f32]| {
            if i.first() == Some(&-7.0) {
                return Err("on purpose".into());
            }
            o.copy_from_slice(i);
            Ok(())
        }
    }));
    let mut poisoned = input.clone();
    poisoned[2 * 16_384] = -7.0;
    let mut out = vec![0.0; poisoned.len()];
    assert!(bad.run(&poisoned, &mut out).is_err());
    want.add("run", 1);
    want.uncounted("fails_on_the_third_chunk");

    // The user's own ranges, nested, formatted, on several threads.
    let _outer = Range::new("user outer");
    want.add("user outer", 1);
    std::thread::scope(|s| {
        for t in 0..3 {
            s.spawn(move || {
                for k in 0..10 {
                    let _r = Range::fmt(format_args!("user thread {t}"));
                    let _inner = Range::fmt(format_args!("user step {}", k % 2));
                }
            });
        }
    });
    for t in 0..3 {
        want.add(&format!("user thread {t}"), 10);
    }
    want.add("user step 0", 15);
    want.add("user step 1", 15);
    assert!(prism_stream::nvtx::listening());
}

/// Every run mode on GPU 0, the coordinator, the triple buffer, and a
/// multi-GPU run over every GPU.
fn gpu_work(want: &mut Expect) {
    let Some(mut ctx) = gpu_or_skip("nvtx_child (gpu)") else {
        panic!("the GPU child found no GPU");
    };
    let gpu = ctx.gpu().clone();
    // 1 MiB chunks (262,144 f32): the 1,000,003 elements below are 4 chunks.
    let config = PipelineConfig {
        chunk_bytes: 1 << 20,
        ..PipelineConfig::default()
    };
    let mut p = ctx.create_pipeline_manager::<f32>(config.clone()).unwrap();
    pipeline(&mut p);
    let n = 1_000_003;
    let input = random_f32(9, n);
    let mut output = vec![0.0; n];
    let pinned_in = PinnedBuffer::from_slice(&gpu, &input, HostAllocFlags::DEFAULT).unwrap();
    let mut pinned_out = PinnedBuffer::<f32>::new(&gpu, n, HostAllocFlags::DEFAULT).unwrap();

    let c = p.get_stats().chunks;
    p.run(&input, &mut output).unwrap();
    want.add("run", 1);
    want.gpu_chunks(chunks_since(&p, c), true);

    let c = p.get_stats().chunks;
    p.run_pinned(&pinned_in, &mut pinned_out).unwrap();
    want.add("run_pinned", 1);
    want.gpu_chunks(chunks_since(&p, c), false);

    let lens = [100usize, 200_000, 250_000, 5, 70_000];
    let c = p.get_stats().chunks;
    let mut outs: Vec<Vec<f32>> = lens.iter().map(|&l| vec![0.0; l]).collect();
    let items: Vec<(&[f32], &mut [f32])> = outs
        .iter_mut()
        .map(|o| (&input[..o.len()], o.as_mut_slice()))
        .collect();
    assert_eq!(p.run_items(items).unwrap(), lens.len() as u64);
    want.add("run_items", 1);
    want.gpu_chunks(chunks_since(&p, c), true);

    let c = p.get_stats().chunks;
    let item_in: Vec<PinnedBuffer<f32>> = lens
        .iter()
        .map(|&l| PinnedBuffer::from_slice(&gpu, &input[..l], HostAllocFlags::DEFAULT).unwrap())
        .collect();
    let mut item_out: Vec<PinnedBuffer<f32>> = lens
        .iter()
        .map(|&l| PinnedBuffer::new(&gpu, l, HostAllocFlags::DEFAULT).unwrap())
        .collect();
    let items: Vec<(&PinnedBuffer<f32>, &mut PinnedBuffer<f32>)> =
        item_in.iter().zip(item_out.iter_mut()).collect();
    assert_eq!(p.run_items_pinned(items).unwrap(), lens.len() as u64);
    want.add("run_items_pinned", 1);
    want.gpu_chunks(chunks_since(&p, c), false);

    let c = p.get_stats().chunks;
    let pieces: Vec<&[f32]> = input.chunks(100_000).collect();
    p.run_stream(
        from_iter(pieces),
        sink_fn(|_, _: &[f32]| Ok::<_, StageError>(())),
    )
    .unwrap();
    want.add("run_stream", 1);
    want.gpu_chunks(chunks_since(&p, c), false);

    let c = p.get_stats().chunks;
    for k in 0..3 {
        p.execute_iteration(&input[k * 1000..(k + 1) * 1000])
            .unwrap();
        want.add("execute_iteration", 1);
    }
    p.flush().unwrap();
    want.add("flush", 1);
    want.gpu_chunks(chunks_since(&p, c), true);

    let c = p.get_stats().chunks;
    for k in 0..2 {
        let r = k * 1000..(k + 1) * 1000;
        p.execute_iteration_pinned(&pinned_in, r, &mut pinned_out, k * 1000)
            .unwrap();
        want.add("execute_iteration_pinned", 1);
    }
    p.flush().unwrap();
    want.add("flush", 1);
    want.gpu_chunks(chunks_since(&p, c), false);

    let c = p.get_stats().chunks;
    p.execute_iteration_blocking(&input[..4096]).unwrap();
    want.add("execute_iteration_blocking", 1);
    want.gpu_chunks(chunks_since(&p, c), true);

    let c = p.get_stats().chunks;
    p.execute_iteration_blocking_pinned(&pinned_in, 0..4096, &mut pinned_out, 0)
        .unwrap();
    want.add("execute_iteration_blocking_pinned", 1);
    want.gpu_chunks(chunks_since(&p, c), false);
    drop(p);

    coordinator_work(&mut ctx, &input, &pinned_in, want);
    drop(pinned_out);

    // The triple buffer, driven by hand: its own upload and process steps,
    // the engine's download.
    let mut tb = ctx.create_triple_buffer::<f32>(4096).unwrap();
    tb.upload(&input[..4096]).unwrap();
    want.add("upload", 1);
    tb.process(|l: &mut Launch<'_>, buf, len| l.fma_chain_in_place(buf, len, 2.0, 0.0, 1))
        .unwrap();
    want.add("process", 1);
    tb.download().unwrap();
    want.add("download", 1);
    assert_eq!(tb.wait_output(|_, out| out.len()).unwrap(), Some(4096));
    drop(tb);

    // Every GPU: one range per run, one per GPU thread per run.
    let mut m = MultiGpuPipeline::<f32>::new(Backend::AllGpus, config).unwrap();
    m.add_stage(FMA);
    m.add_stage(CLAMP);
    let gpus = m.gpus().len();
    let c = m.get_stats().chunks;
    m.run(&input, &mut output).unwrap();
    want.add("multi.run", 1);
    want.gpu_chunks(m.get_stats().chunks - c, true);
    let c = m.get_stats().chunks;
    let pieces: Vec<&[f32]> = input.chunks(100_000).collect();
    m.run_stream(
        from_iter(pieces),
        sink_fn(|_, _: &[f32]| Ok::<_, StageError>(())),
    )
    .unwrap();
    want.add("multi.run_stream", 1);
    want.gpu_chunks(m.get_stats().chunks - c, false);
    for i in 0..gpus {
        want.add(&format!("multi.gpu {i}"), 2);
    }
}

/// One of each coordinator op.
fn coordinator_work(
    ctx: &mut ManagedGpuContext,
    input: &[f32],
    pinned_in: &PinnedBuffer<f32>,
    want: &mut Expect,
) {
    let gpu = ctx.gpu().clone();
    let mut out = PinnedBuffer::<f32>::new(&gpu, 4096, HostAllocFlags::DEFAULT).unwrap();
    let c = ctx.async_coordinator_mut().unwrap();
    let mut d = c.zeroed::<f32>(4096).unwrap();
    let up = c.queue_upload_slice(&input[..4096], &mut d, &[]).unwrap();
    want.add("queue_upload_slice", 1);
    let up = c.queue_upload_n(pinned_in, &mut d, 4096, &[up]).unwrap();
    want.add("queue_upload", 1);
    let k = c
        .queue_compute("nvtx scale", &[up], |l| {
            l.fma_chain_in_place(&mut d, 4096, 2.0, 0.0, 1)
        })
        .unwrap();
    want.add("queue_compute: nvtx scale", 1);
    let down = c.queue_download(&d, &mut out, &[k]).unwrap();
    want.add("queue_download", 1);
    c.wait(down).unwrap();
    want.add("wait", 1);
    c.synchronize_all().unwrap();
    want.add("synchronize_all", 1);
}

#[test]
fn host_runs_push_one_range_per_run_and_per_chunk_stage() {
    let so = match counter() {
        Ok(so) => so,
        Err(NoCounter::NoCompiler(why)) => {
            println!(
                "SKIPPED host_runs_push_one_range_per_run_and_per_chunk_stage: \
                 no C compiler for the NVTX counter ({why})"
            );
            return;
        }
        Err(NoCounter::Failed(why)) => panic!("the NVTX counter library: {why}"),
    };
    let (want, got) = in_child("host", &so);
    check("host", &want, &got);
}

#[test]
fn gpu_nvtx_ranges_count_every_run_mode_and_chunk_step() {
    let Some(ctx) = gpu_or_skip("gpu_nvtx_ranges_count_every_run_mode_and_chunk_step") else {
        return;
    };
    // The child opens the GPU itself.
    drop(ctx);
    if under_sanitizer() {
        println!(
            "SKIPPED gpu_nvtx_ranges_count_every_run_mode_and_chunk_step: under \
             compute-sanitizer (host-side ranges only; the plain pass runs it)"
        );
        return;
    }
    let so = match counter() {
        Ok(so) => so,
        Err(NoCounter::NoCompiler(why)) if !gpu_required() => {
            println!(
                "SKIPPED gpu_nvtx_ranges_count_every_run_mode_and_chunk_step: \
                 no C compiler for the NVTX counter ({why})"
            );
            return;
        }
        Err(e) => panic!("the NVTX counter library: {e:?}"),
    };
    let (want, got) = in_child("gpu", &so);
    check("gpu", &want, &got);
}
