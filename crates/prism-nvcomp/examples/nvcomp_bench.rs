//! nvCOMP on this GPU, in one process:
//!
//! 1. per codec and data shape (sorted integers, smooth sensor floats,
//!    text-like bytes): batched compression and decompression throughput
//!    (GPU time between fences on the lane, best of 3 after a warm-up),
//!    compression ratio, every decompressed byte compared with the input;
//! 2. the link's one-way rate (pinned host → device copy, best of 3);
//! 3. a sensor-float dataset compressed on the GPU into a chunk file (in
//!    memory), then streamed back from it through the ring
//!    (`prism_nvcomp::stream::run_compressed`): frames cross the link
//!    compressed, nvCOMP decompresses them, a prism stage runs, the output
//!    comes back; effective input rate = uncompressed bytes ÷ wall time,
//!    against the link's rate; every output element checked against the
//!    stage's CPU form (`Stage::host`) over regenerated input.
//!
//! Without a GPU or without libnvcomp it says so and exits 0.
//!
//! `cargo run --release -p prism-nvcomp --example nvcomp_bench -- --help`

use std::io::Cursor;
use std::time::Instant;

use clap::Parser;
use prism_nvcomp::format::{ChunkFileReader, ChunkFileWriter};
use prism_nvcomp::stream::{run_compressed, StreamConfig};
use prism_nvcomp::{ChunkLoc, Codec, Compressor, DataType, Decompressor, Nvcomp};
use prism_pipeline::{Fma, GroupSum, Stage};
use prism_stream::{as_bytes, DeviceBuffer, Element, Gpu, HostAllocFlags, Lane, PinnedBuffer};

#[derive(Debug, Parser)]
struct Args {
    /// Codecs to measure (comma-separated names; default all)
    #[arg(long, value_delimiter = ',')]
    codecs: Vec<String>,
    /// MiB of each data shape for the per-codec measurement
    #[arg(long, default_value_t = 256)]
    mib: usize,
    /// KiB per nvCOMP chunk
    #[arg(long, default_value_t = 64)]
    chunk_kib: usize,
    /// GiB of sensor floats streamed from compressed chunks (0: skip)
    #[arg(long, default_value_t = 4)]
    stream_gib: usize,
    /// Codec of the streamed dataset
    #[arg(long, default_value = "cascaded")]
    stream_codec: String,
    /// nvCOMP chunks per ring frame
    #[arg(long, default_value_t = 256)]
    frame_chunks: usize,
}

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

// ---- the data shapes (deterministic, by element index) ----

/// Sorted u32: ascending with small pseudo-random gaps (IDs, timestamps).
fn sorted_ints(n: usize) -> Vec<u32> {
    let mut v = Vec::with_capacity(n);
    let mut x = 0u32;
    let mut s = 0x9E37_79B9u32;
    for _ in 0..n {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        x = x.wrapping_add(s & 15);
        v.push(x);
    }
    v
}

/// A slow sensor sampled fast, quantised to its ADC step (1/64 unit).
fn sensor(i: u64) -> f32 {
    let t = i as f64 * 1e-5;
    let v = 20.0 + 5.0 * t.sin() + 0.5 * (t * 7.3).sin();
    ((v * 64.0).round() / 64.0) as f32
}

/// Text-like bytes: log lines from a small vocabulary.
fn text(n: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "GET",
        "POST",
        "/api/v1/items",
        "/index.html",
        "200",
        "404",
        "user",
        "session",
        "ok",
        "timeout",
        "INFO",
        "WARN",
        "request",
        "latency_ms=",
        "bytes=",
        "host=node",
        "cache",
        "miss",
        "hit",
        "the",
        "of",
        "and",
        "error",
        "retry",
    ];
    let mut out = Vec::with_capacity(n + 64);
    let mut s = 0x2545_F491u32;
    let mut line = 0u64;
    while out.len() < n {
        out.extend_from_slice(
            format!("2026-12-07T10:{:02}:{:02} ", (line / 60) % 60, line % 60).as_bytes(),
        );
        for _ in 0..8 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            out.extend_from_slice(WORDS[(s as usize) % WORDS.len()].as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(format!("{}\n", s % 1000).as_bytes());
        line += 1;
    }
    out.truncate(n);
    out
}

fn gbps(bytes: usize, ms: f64) -> f64 {
    bytes as f64 / (ms * 1e-3) / 1e9
}

// ---- per codec ----

struct CodecFigures {
    ratio: f64,
    compress_gbps: f64,
    decompress_gbps: f64,
}

fn measure_codec<T: Element>(
    nv: &Nvcomp,
    lane: &mut Lane,
    codec: Codec,
    data: &[T],
    chunk: usize,
) -> BoxResult<CodecFigures> {
    let dt = DataType::of_size(std::mem::size_of::<T>()).ok_or("element size")?;
    let bytes = std::mem::size_of_val(data);
    let n = bytes.div_ceil(chunk);
    let input = DeviceBuffer::from_slice(lane, data)?;
    let mut comp = Compressor::new(nv, lane, codec, dt, chunk, n)?;
    let mut packed = DeviceBuffer::<u8>::zeroed(lane, comp.output_bytes(bytes))?;
    let mut best_c = f64::MAX;
    let mut sizes = Vec::new();
    for _ in 0..4 {
        let start = lane.timed_fence()?;
        let pending = comp.compress(&mut lane.launch(), &input, bytes, &mut packed)?;
        let end = lane.timed_fence()?;
        sizes = pending.wait()?;
        lane.synchronize()?;
        best_c = best_c.min(f64::from(end.elapsed_ms_since(&start)?));
    }
    let locs: Vec<ChunkLoc> = sizes
        .iter()
        .enumerate()
        .map(|(i, &c)| ChunkLoc {
            offset: i * comp.stride(),
            compressed: c,
            uncompressed: chunk.min(bytes - i * chunk),
        })
        .collect();
    let mut dec = Decompressor::new(nv, lane, codec, chunk, n)?;
    let mut out = DeviceBuffer::<u8>::zeroed(lane, bytes)?;
    let mut best_d = f64::MAX;
    for _ in 0..4 {
        let start = lane.timed_fence()?;
        // SAFETY: `packed` is what the compressor above made from `data`
        // with this codec, in this process.
        let pending = unsafe { dec.decompress(&mut lane.launch(), &packed, &locs, &mut out) }?;
        let end = lane.timed_fence()?;
        pending.wait()?;
        lane.synchronize()?;
        best_d = best_d.min(f64::from(end.elapsed_ms_since(&start)?));
    }
    let back = lane.read_async(&out, 0, bytes)?.wait()?;
    if back != as_bytes(data) {
        return Err(format!("{codec}: decompressed bytes differ from the input").into());
    }
    Ok(CodecFigures {
        ratio: bytes as f64 / sizes.iter().sum::<usize>() as f64,
        compress_gbps: gbps(bytes, best_c),
        decompress_gbps: gbps(bytes, best_d),
    })
}

// ---- the link ----

fn link_rate(gpu: &Gpu, lane: &mut Lane) -> BoxResult<f64> {
    let n = 256 << 20; // 1 GiB of f32
    let host = PinnedBuffer::<f32>::new(gpu, n, HostAllocFlags::UPLOAD_ONLY)?;
    let mut dev = DeviceBuffer::<f32>::zeroed(lane, n)?;
    let mut best = f64::MAX;
    for _ in 0..4 {
        let (start, end) = lane.copy_htod_timed(&host, 0, &mut dev, 0, n, true)?;
        lane.synchronize()?;
        best = best.min(f64::from(end.elapsed_ms_since(&start.ok_or("untimed")?)?));
    }
    Ok(gbps(n * 4, best))
}

// ---- the stream ----

/// The dataset compressed on the GPU, batch by batch, into a chunk file in memory.
fn build_file(
    nv: &Nvcomp,
    gpu: &Gpu,
    lane: &mut Lane,
    codec: Codec,
    elems: u64,
    chunk: usize,
) -> BoxResult<Vec<u8>> {
    let batch_elems = (256usize << 20) / 4;
    let mut comp = Compressor::new(
        nv,
        lane,
        codec,
        DataType::U32,
        chunk,
        (batch_elems * 4).div_ceil(chunk),
    )?;
    let mut w = ChunkFileWriter::new(Vec::new(), codec, 4, chunk as u64)?;
    let mut host_in = PinnedBuffer::<f32>::new(gpu, batch_elems, HostAllocFlags::UPLOAD_ONLY)?;
    let mut dev_in = DeviceBuffer::<f32>::zeroed(lane, batch_elems)?;
    let mut dev_out = DeviceBuffer::<u8>::zeroed(lane, comp.output_bytes(batch_elems * 4))?;
    let mut host_out = PinnedBuffer::<u8>::new(gpu, dev_out.len(), HostAllocFlags::DEFAULT)?;
    let mut at = 0u64;
    while at < elems {
        let len = batch_elems.min((elems - at) as usize);
        for (j, v) in host_in.wait_mut_slice()?[..len].iter_mut().enumerate() {
            *v = sensor(at + j as u64);
        }
        lane.copy_htod(&host_in, 0, &mut dev_in, 0, len)?;
        let pending = comp.compress(&mut lane.launch(), &dev_in, len * 4, &mut dev_out)?;
        let sizes = pending.wait()?;
        let used = sizes.len() * comp.stride();
        lane.copy_dtoh(&dev_out, 0, &mut host_out, 0, used)?;
        let packed = host_out.wait_slice()?;
        for (i, &c) in sizes.iter().enumerate() {
            let raw = chunk.min(len * 4 - i * chunk) as u64;
            w.push(&packed[i * comp.stride()..i * comp.stride() + c], raw)?;
        }
        at += len as u64;
    }
    Ok(w.finish()?.0)
}

/// Streams the file through `stage`, checking every output element against
/// `stage.host` over the regenerated input.
fn stream_through<S: Stage<f32> + Clone>(
    nv: &Nvcomp,
    gpu: &Gpu,
    file: &[u8],
    stage: &mut S,
    frame_chunks: usize,
    link: f64,
    exact: bool,
) -> BoxResult<()> {
    let mut reader = ChunkFileReader::open(Cursor::new(file))?;
    reader.set_verify(false); // checked once below, before the timed run
    let info = reader.info();
    {
        let mut check = ChunkFileReader::open(Cursor::new(file))?;
        let mut buf = vec![0u8; check.max_frame_bytes(frame_chunks)];
        let mut first = 0usize;
        while first < info.chunks as usize {
            let count = frame_chunks.min(info.chunks as usize - first);
            check.read_frame(first, count, &mut buf)?;
            first += count;
        }
    }
    let frame_elems = frame_chunks * info.chunk_bytes as usize / 4;
    let mut bad = 0u64;
    let mut checked = 0u64;
    let mut input = Vec::new();
    let mut expect = Vec::new();
    // The CPU form, from a copy of the stage's parameters (the stage itself
    // is lent to the run).
    let host = stage.clone();
    let name = stage.name().to_string();
    // SAFETY: the file was written just above by ChunkFileWriter, in a
    // temporary folder of this process.
    let report = unsafe {
        run_compressed(
            gpu,
            nv,
            &mut reader,
            stage,
            StreamConfig {
                chunks_per_frame: frame_chunks,
                slots: 3,
            },
            |frame, out: &[f32]| {
                let base = frame * frame_elems as u64;
                let n = frame_elems.min((info.total_bytes / 4 - base) as usize);
                input.clear();
                input.extend((0..n as u64).map(|j| sensor(base + j)));
                expect.resize(out.len(), 0.0);
                host.host(&input, &mut expect)?;
                for (g, c) in out.iter().zip(&expect) {
                    let ok = if exact {
                        g.to_bits() == c.to_bits()
                    } else {
                        (g - c).abs() <= 1e-5 * c.abs().max(1.0)
                    };
                    bad += u64::from(!ok);
                }
                checked += out.len() as u64;
                Ok(())
            },
        )
    }?;
    let eff = report.effective_rate() / 1e9;
    println!(
        "  stream {}: {} frames, {:.2} GiB uncompressed, {:.2} GiB crossed the link (ratio {:.2}), wall {:.3} s",
        name,
        report.frames,
        report.uncompressed_bytes as f64 / (1u64 << 30) as f64,
        report.uploaded_bytes as f64 / (1u64 << 30) as f64,
        report.uncompressed_bytes as f64 / report.uploaded_bytes as f64,
        report.wall.as_secs_f64()
    );
    println!(
        "  stream {}: effective input rate {eff:.1} GB/s = {:.2} x the link's one-way {link:.1} GB/s; {checked} outputs checked ({}), {bad} wrong",
        name,
        eff / link,
        if exact { "bit for bit" } else { "relative 1e-5" }
    );
    if bad > 0 || checked != report.output_elements {
        return Err(format!(
            "stream {}: {bad} wrong outputs, {checked} of {} checked",
            name, report.output_elements
        )
        .into());
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nvcomp_bench: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> BoxResult<()> {
    let gpu = match Gpu::open(0) {
        Ok(g) => g,
        Err(e @ (prism_stream::Error::DriverNotFound | prism_stream::Error::NoDevice)) => {
            println!("nvcomp_bench: SKIPPED (no GPU: {e})");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let nv = match Nvcomp::load() {
        Ok(nv) => nv,
        Err(e @ prism_nvcomp::Error::LibraryNotFound { .. }) => {
            println!("nvcomp_bench: SKIPPED (no nvCOMP: {e})");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    println!(
        "nvcomp_bench: GPU 0 {:?}, nvCOMP {} from {}",
        gpu.info(),
        nv.version_string(),
        nv.path().display()
    );
    let codecs: Vec<Codec> = if args.codecs.is_empty() {
        Codec::ALL.to_vec()
    } else {
        args.codecs
            .iter()
            .map(|c| Codec::from_name(c).ok_or(format!("unknown codec {c}")))
            .collect::<Result<_, _>>()?
    };
    let chunk = args.chunk_kib << 10;
    let bytes = args.mib << 20;
    let mut lane = Lane::new(&gpu)?;
    let ints = sorted_ints(bytes / 4);
    let floats: Vec<f32> = (0..(bytes / 4) as u64).map(sensor).collect();
    let words = text(bytes);
    println!("per codec, {} MiB per shape, {} KiB chunks (GPU time, best of 3 after a warm-up; GB/s of uncompressed bytes):", args.mib, args.chunk_kib);
    println!(
        "  {:<9} {:<14} {:>7} {:>12} {:>14}",
        "codec", "data", "ratio", "compress", "decompress"
    );
    for &codec in &codecs {
        let shapes: [(&str, BoxResult<CodecFigures>); 3] = [
            (
                "sorted u32",
                measure_codec(&nv, &mut lane, codec, &ints, chunk),
            ),
            (
                "sensor f32",
                measure_codec(&nv, &mut lane, codec, &floats, chunk),
            ),
            (
                "text bytes",
                measure_codec(&nv, &mut lane, codec, &words, chunk),
            ),
        ];
        for (shape, r) in shapes {
            match r {
                Ok(f) => println!(
                    "  {:<9} {:<14} {:>7.2} {:>9.1} GB/s {:>9.1} GB/s",
                    codec.name(),
                    shape,
                    f.ratio,
                    f.compress_gbps,
                    f.decompress_gbps
                ),
                Err(e) => println!("  {:<9} {:<14} failed: {e}", codec.name(), shape),
            }
        }
    }
    drop((ints, floats, words));
    let link = link_rate(&gpu, &mut lane)?;
    println!("link: host -> device {link:.1} GB/s (pinned, 1 GiB, best of 3)");
    if args.stream_gib == 0 {
        return Ok(());
    }
    let codec = Codec::from_name(&args.stream_codec).ok_or("unknown --stream-codec")?;
    let elems = (args.stream_gib as u64) << 28;
    let t = Instant::now();
    let file = build_file(&nv, &gpu, &mut lane, codec, elems, chunk)?;
    let info = ChunkFileReader::open(Cursor::new(&file[..]))?.info();
    println!(
        "stream: {} GiB of sensor f32 compressed with {codec} into a {:.2} GiB chunk file (ratio {:.2}) in {:.1} s",
        args.stream_gib,
        file.len() as f64 / (1u64 << 30) as f64,
        info.ratio(),
        t.elapsed().as_secs_f64()
    );
    stream_through(
        &nv,
        &gpu,
        &file,
        &mut Fma {
            a: 1.0001,
            b: 0.5,
            iters: 1,
        },
        args.frame_chunks,
        link,
        true,
    )?;
    stream_through(
        &nv,
        &gpu,
        &file,
        &mut GroupSum { group: 1024 },
        args.frame_chunks,
        link,
        false,
    )?;
    println!("nvcomp_bench: OK");
    Ok(())
}
