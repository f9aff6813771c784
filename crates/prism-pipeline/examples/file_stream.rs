//! File → stages → file: writes a file of random f32, measures the disk
//! bound of reading it (a plain direct read, no processing, in this
//! process), streams it through an FMA with `run_stream(FileSource,
//! FileSink)`, checks every output against the CPU, and prints the run's
//! rate against the bound and the I/O mode the file system gave. The stream
//! runs twice: reads in `fill` (read-ahead off), then with a read-ahead
//! thread of `--read-ahead` buffers (0 skips the second run), each with
//! its disk time and, with read-ahead, the time `fill` still waited. It
//! also says whether GPUDirect Storage (cuFile) works here and in which
//! mode (`--features cufile`; prism itself reads with `O_DIRECT`).
//!
//! ```text
//! cargo run --release -p prism-pipeline --example file_stream [-- --mib 1024 --chunk-mib 16 --dir /data --read-ahead 2]
//! ```
//! Runs on the GPU when there is one, else on the host backend. The files
//! go in `--dir` (default: the system's temporary directory; `/tmp` may be
//! tmpfs, which refuses direct I/O before Linux 6.6: then buffered) and are
//! removed after.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use prism_pipeline::file::read_bound_with;
use prism_pipeline::{
    Backend, FileOptions, FileSink, FileSource, Fma, PipelineConfig, PipelineStageManager,
};
use prism_stream::{fma_chain_cpu, pattern};

const STAGE: Fma = Fma {
    a: 1.0001,
    b: 0.5,
    iters: 1,
};

#[derive(Parser)]
struct Args {
    /// MiB of input.
    #[arg(long, default_value_t = 256)]
    mib: usize,
    /// MiB per chunk.
    #[arg(long, default_value_t = 16)]
    chunk_mib: usize,
    /// Where the files go.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Buffered I/O only.
    #[arg(long)]
    buffered: bool,
    /// Buffers of read-ahead for the second run (0: no second run).
    #[arg(long, default_value_t = 2)]
    read_ahead: usize,
}

/// Element `i` of the input, in [-1, 1).
fn input(i: u64) -> f32 {
    ((pattern(0xF11E, i) >> 8) as f32) * (2.0 / (1u32 << 24) as f32) - 1.0
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::Builder::new()
        .prefix("prism-file-stream-")
        .tempdir_in(args.dir.unwrap_or_else(std::env::temp_dir))?;
    let (inp, out) = (dir.path().join("in.f32"), dir.path().join("out.f32"));
    let n = (args.mib << 20) / 4;

    // The input, written and synced (so the reads below come from the disk
    // or, buffered, from the cache: the mode line says which).
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&inp)?);
    for i in 0..n as u64 {
        f.write_all(&input(i).to_ne_bytes())?;
    }
    f.into_inner()?.sync_all()?;

    let opts = FileOptions {
        direct: !args.buffered,
        ..FileOptions::default()
    };
    let chunk_bytes = args.chunk_mib << 20;
    let bound = read_bound_with(&inp, &opts, chunk_bytes)?;
    println!("disk bound (plain read, no processing): {bound}");
    // prism reads through O_DIRECT into pinned slots; what cuFile would offer
    // here (built with the `cufile` feature, as the GPU bundle is).
    println!("cuFile (GPUDirect Storage): {}", prism_stream::gds_status());

    let config = PipelineConfig {
        chunk_bytes,
        ..PipelineConfig::default()
    };
    let mut p = PipelineStageManager::<f32>::new(Backend::Auto, config)?;
    p.add_stage(STAGE);
    let mut runs = vec![0];
    if args.read_ahead > 0 {
        runs.push(args.read_ahead);
    }
    for read_ahead in runs {
        let opts = FileOptions {
            read_ahead,
            ..opts.clone()
        };
        let mut src = FileSource::<f32>::open(&inp, opts.clone())?;
        let mut sink = FileSink::<f32>::create(&out, opts)?;
        let started = Instant::now();
        let counts = p.run_stream(&mut src, &mut sink)?;
        let sink_stats = sink.finish()?;
        let secs = started.elapsed().as_secs_f64();
        let s = src.stats();
        let bytes = s.bytes;
        let backend = p.get_stats().backend.map_or("?".into(), |b| b.to_string());
        println!();
        println!(
            "run, read-ahead {} ({backend}, {} chunks): {bytes} bytes in {secs:.3} s = {:.2} GB/s, {:.2} of the disk bound",
            if read_ahead == 0 {
                "off".to_string()
            } else {
                format!("{read_ahead} buffers")
            },
            counts.chunks,
            bytes as f64 / secs / 1e9,
            bound.fraction(bytes, secs)
        );
        if read_ahead == 0 {
            println!(
                "disk busy (read and write calls, one after another on the run's thread): {:.1} ms of {:.1} ms wall",
                s.io_ms + sink_stats.io_ms,
                secs * 1e3
            );
        } else {
            println!(
                "reads {:.1} ms on the read-ahead thread, of which fill waited {:.1} ms; writes {:.1} ms; {:.1} ms wall",
                s.io_ms,
                s.wait_ms,
                sink_stats.io_ms,
                secs * 1e3
            );
        }
        println!(
            "source ({}{}): {s}",
            src.mode(),
            src.fallback().map(|r| format!(": {r}")).unwrap_or_default(),
        );
        println!(
            "sink   ({}{}): {sink_stats}",
            sink.mode(),
            sink.fallback()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
        check(&out, n)?;
    }
    Ok(())
}

/// Every output against the CPU.
fn check(out: &std::path::Path, n: usize) -> Result<(), Box<dyn std::error::Error>> {
    let mut r = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(out)?);
    let mut buf = [0u8; 4];
    let mut bad = 0u64;
    for i in 0..n as u64 {
        r.read_exact(&mut buf)?;
        let want = fma_chain_cpu(input(i), STAGE.a, STAGE.b, STAGE.iters);
        bad += u64::from(f32::from_ne_bytes(buf).to_bits() != want.to_bits());
    }
    if r.read(&mut buf)? != 0 {
        return Err("the output is longer than the input".into());
    }
    println!("checked {n} outputs: {bad} differ");
    if bad > 0 {
        return Err(format!("{bad} outputs differ from the CPU").into());
    }
    Ok(())
}
