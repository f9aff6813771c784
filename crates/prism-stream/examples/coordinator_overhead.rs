//! Host cost of the coordinator: `queue_upload` + `queue_compute` +
//! `queue_download`, each with one dependency, against the same three calls
//! made on cudarc directly and on the raw driver API. Small copies, so the
//! host side dominates. Prints µs per op and the ratio. Not a test: a
//! measurement.
//!
//! Every variant makes the same nine driver calls per iteration (a stream
//! wait, the copy or launch, an event record, three times) on events it has
//! not used in the round yet: prism takes pooled events, the cudarc and raw
//! loops a ring of 3 x ITERS events made beforehand. The cudarc loop runs on
//! a context handle of its own with event tracking off (prism's keeps it on
//! for users' `CudaSlice`s) and copies from plain slices of its pinned buffers
//! (cudarc's `PinnedHostSlice` would add a stream wait on the slice's own
//! event to every copy, even with tracking off).
//!
//! Two regimes:
//! - **GPU held**: before the timed loop, the three streams are made to wait
//!   on a spin kernel that outlasts it, so nothing queued runs while the host
//!   queues: host cost only, never the GPU's speed at running the chain. The
//!   driver then holds thousands of commands behind a wait, which makes every
//!   call dearer than with the GPU running, for every variant. A round whose
//!   hold ran out before the loop ended is flagged.
//! - **GPU running**: the GPU runs the chain as it is queued (the host may
//!   then also wait for queue space); "done" is the time until the GPU
//!   finished everything.
//!
//! Each prism round first runs one untimed batch on its coordinator, so the
//! op table's allocations are grown before the timed one.
//!
//! Then the cost of single calls (bind, event record, pooled fence, stream
//! wait, event query) so a gap can be placed.
//!
//! `cargo run --release -p prism-stream --example coordinator_overhead`

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Instant;

use prism_stream::cudarc::driver::sys::{self, CUresult};
use prism_stream::cudarc::driver::{
    result, CudaContext, CudaFunction, CudaModule, CudaStream, DevicePtr,
};
use prism_stream::cudarc::nvrtc::Ptx;
use prism_stream::{
    AsyncCoordinator, DeviceBuffer, Error, Gpu, HostAllocFlags, Lane, PinnedBuffer, StreamPurpose,
};
use prism_testing::{gpu_required, random_f32};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::prelude::*;

/// Iterations (3 ops each) per timed round.
const ITERS: usize = 1000;
/// f32 per copy.
const N: usize = 1024;
/// Timed rounds per variant (one untimed warm-up round comes first).
const ROUNDS: usize = 9;
/// Length of the spin kernel that holds the streams in the held regime.
const HOLD_NS: u64 = 300_000_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Regime {
    Held,
    Running,
}

/// One timed round: host µs per op, and µs per op until the GPU finished.
#[derive(Clone, Copy)]
struct Round {
    host_us: f64,
    done_us: f64,
    /// False if the hold expired before the host finished queueing.
    held_ok: bool,
}

type Variant = fn(&Gpu, Regime) -> Result<Round, Error>;

fn main() {
    // Logs to stderr, warnings only unless RUST_LOG says (`RUST_LOG=prism=debug`
    // shows prism's spans as they close, with their busy and idle time).
    let filter: Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::WARN));
    tracing_subscriber::fmt()
        .with_max_level(LevelFilter::TRACE)
        .with_span_events(FmtSpan::CLOSE)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .finish()
        .with(filter)
        .init();
    let gpu = match Gpu::open(0) {
        Ok(g) => g,
        Err(e @ (Error::DriverNotFound | Error::NoDevice)) if !gpu_required() => {
            println!("coordinator_overhead: no GPU here ({e}); nothing to measure");
            return;
        }
        Err(e) => panic!("coordinator_overhead: {e}"),
    };
    let variants: [(&str, Variant); 5] = [
        ("raw driver", raw_round),
        ("cudarc", cudarc_round),
        ("prism", prism_round),
        ("prism + poll/64 it", prism_poll_round),
        ("prism free fns", prism_free_round),
    ];
    println!(
        "prism coordinator_overhead: {ITERS} x (upload + compute + download, 1 dependency each), {N} f32 per copy, median of {ROUNDS} rounds (interleaved) on {}",
        gpu.info().name
    );
    println!(
        "prism coordinator_overhead: {:<8} {:<20} {:>10} {:>10} {:>10} {:>10}",
        "regime", "variant", "host us/op", "min", "max", "done us/op"
    );
    let mut medians = Vec::new();
    for regime in [Regime::Held, Regime::Running] {
        let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); variants.len()];
        for r in 0..=ROUNDS {
            for (i, (name, f)) in variants.iter().enumerate() {
                let round = f(&gpu, regime).unwrap_or_else(|e| panic!("{name}: {e}"));
                if r > 0 {
                    rounds[i].push(round);
                }
            }
        }
        let label = match regime {
            Regime::Held => "held",
            Regime::Running => "running",
        };
        for (i, (name, _)) in variants.iter().enumerate() {
            let rs = &rounds[i];
            let mut host: Vec<f64> = rs.iter().map(|r| r.host_us).collect();
            let mut done: Vec<f64> = rs.iter().map(|r| r.done_us).collect();
            host.sort_by(f64::total_cmp);
            done.sort_by(f64::total_cmp);
            let expired = rs.iter().filter(|r| !r.held_ok).count();
            let (med, lo, hi) = (host[host.len() / 2], host[0], host[host.len() - 1]);
            // Held, "done" only measures the hold.
            let done_col = match regime {
                Regime::Held => "-".to_string(),
                Regime::Running => format!("{:.3}", done[done.len() / 2]),
            };
            println!(
                "prism coordinator_overhead: {label:<8} {name:<20} {med:>10.3} {lo:>10.3} {hi:>10.3} {done_col:>10}{}",
                if expired > 0 {
                    format!("  ({expired} rounds: hold expired, not host-only)")
                } else {
                    String::new()
                }
            );
            medians.push((regime, *name, med));
        }
    }
    let get = |regime, name| {
        medians
            .iter()
            .find(|(r, n, _)| *r == regime && *n == name)
            .map(|m| m.2)
            .unwrap_or(f64::NAN)
    };
    for (regime, label) in [
        (Regime::Held, "GPU held (host cost only)"),
        (Regime::Running, "GPU running"),
    ] {
        let (p, c) = (get(regime, "prism"), get(regime, "cudarc"));
        println!(
            "prism coordinator_overhead: {label}: prism {p:.3} us/op, cudarc {c:.3} us/op, prism - cudarc = {:+.3} us/op, ratio {:.2}",
            p - c,
            p / c
        );
    }
    micro(&gpu).expect("single-call costs");
}

/// Makes `streams` wait on a spin kernel of [`HOLD_NS`] on a stream of its
/// own; returns that stream and the event that ends the hold.
fn hold(
    ctx: &Arc<CudaContext>,
    streams: &[&CudaStream],
) -> Result<(Arc<CudaStream>, sys::CUevent), Error> {
    let s = ctx.new_stream().map_err(drv)?;
    let ev = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(drv)?;
    // SAFETY: `s` is a live stream of the current context; the spin kernel
    // touches no memory.
    let code = if prism_cuda_sys::KERNELS_BUILT {
        // SAFETY: as above.
        unsafe { prism_cuda_sys::prism_spin_ns(HOLD_NS, s.cu_stream().cast()) }
    } else {
        let mut ns = HOLD_NS;
        // SAFETY: `prism_k_spin_ns(u64)` takes one u64 and touches no memory.
        unsafe {
            ptx_launch(
                &s,
                "prism_k_spin_ns",
                1,
                1,
                &mut [(&mut ns as *mut u64).cast()],
            )
        }?
    };
    if code != 0 {
        return Err(Error::Kernel {
            kernel: "spin_ns",
            code,
            message: "spin kernel launch failed".into(),
        });
    }
    // SAFETY: `ev` and the streams are live handles of the current context.
    unsafe {
        result::event::record(ev, s.cu_stream()).map_err(drv)?;
        for st in streams {
            result::stream::wait_event(
                st.cu_stream(),
                ev,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
            .map_err(drv)?;
        }
    }
    Ok((s, ev))
}

/// Is the hold still on (its event not reached)?
fn still_held(ev: sys::CUevent) -> bool {
    // SAFETY: `ev` is a live event (destroyed only in `release`).
    let state = unsafe { result::event::query(ev) };
    matches!(
        state,
        Err(result::DriverError(CUresult::CUDA_ERROR_NOT_READY))
    )
}

fn release(ev: sys::CUevent) {
    // SAFETY: called once per event after the context synchronised; the
    // driver defers destruction of an event still in use anyway.
    let _ = unsafe { result::event::destroy(ev) };
}

fn drv(e: result::DriverError) -> Error {
    Error::Driver {
        call: "benchmark driver call",
        source: e,
    }
}

/// Times `queue` (the host loop), then the GPU's completion; handles the hold.
/// Synchronises before returning, also when `queue` failed, so the caller's
/// buffers are never freed while queued work may still use them.
fn timed(
    gpu: &Gpu,
    regime: Regime,
    streams: &[&CudaStream],
    mut queue: impl FnMut() -> Result<(), Error>,
) -> Result<Round, Error> {
    gpu.synchronize()?;
    let held = match regime {
        Regime::Held => Some(hold(gpu.cuda_context(), streams)?),
        Regime::Running => None,
    };
    let t = Instant::now();
    let queued = queue();
    let host = t.elapsed().as_secs_f64();
    let held_ok = held.as_ref().is_none_or(|(_, ev)| still_held(*ev));
    let synced = gpu.synchronize();
    let done = t.elapsed().as_secs_f64();
    if let Some((_, ev)) = held {
        release(ev);
    }
    queued?;
    synced?;
    let ops = (3 * ITERS) as f64;
    Ok(Round {
        host_us: host * 1e6 / ops,
        done_us: done * 1e6 / ops,
        held_ok,
    })
}

/// The coordinator, exactly the three calls with one dependency each.
fn prism_round(gpu: &Gpu, regime: Regime) -> Result<Round, Error> {
    prism_coordinator(gpu, regime, usize::MAX)
}

/// The coordinator, also polling for completions every 64 iterations.
fn prism_poll_round(gpu: &Gpu, regime: Regime) -> Result<Round, Error> {
    prism_coordinator(gpu, regime, 64)
}

fn prism_coordinator(gpu: &Gpu, regime: Regime, poll_every: usize) -> Result<Round, Error> {
    let src = PinnedBuffer::from_slice(gpu, &random_f32(1, N), HostAllocFlags::DEFAULT)?;
    let mut dst = PinnedBuffer::<f32>::new(gpu, N, HostAllocFlags::DEFAULT)?;
    let mut c = AsyncCoordinator::new(gpu)?;
    let mut x = c.zeroed::<f32>(N)?;
    let mut y = c.zeroed::<f32>(N)?;
    // SAFETY: the raw streams only get the hold (a wait on an event of a
    // kernel that touches no memory); all of prism's work goes through lanes.
    let streams: Vec<Arc<CudaStream>> = c
        .lanes()
        .iter()
        .map(|l| Arc::clone(unsafe { l.cuda_stream() }))
        .collect();
    let refs: Vec<&CudaStream> = streams.iter().map(|s| &**s).collect();
    let mut batch = |c: &mut AsyncCoordinator| -> Result<(), Error> {
        let mut last = None;
        for i in 0..ITERS {
            let deps: &[_] = match &last {
                Some(d) => std::slice::from_ref(d),
                None => &[],
            };
            let up = c.queue_upload(&src, &mut x, deps)?;
            let k = c.queue_compute("fma", &[up], |l| l.fma_chain(&x, &mut y, N, 1.0, 0.5, 1))?;
            last = Some(c.queue_download(&y, &mut dst, &[k])?);
            if i % poll_every == poll_every - 1 {
                c.poll();
            }
        }
        Ok(())
    };
    // Untimed: grows the op table and the pending list to a round's size.
    batch(&mut c)?;
    c.synchronize_all()?;
    c.poll();
    let round = timed(gpu, regime, &refs, || batch(&mut c));
    c.synchronize_all()?;
    round
}

/// prism's tracked copies and launches on three lanes with event ordering
/// (fences, wait clocks), but no coordinator (no op ids, no op table).
fn prism_free_round(gpu: &Gpu, regime: Regime) -> Result<Round, Error> {
    let src = PinnedBuffer::from_slice(gpu, &random_f32(1, N), HostAllocFlags::DEFAULT)?;
    let mut dst = PinnedBuffer::<f32>::new(gpu, N, HostAllocFlags::DEFAULT)?;
    let mut up = Lane::with_purpose(gpu, StreamPurpose::Upload)?;
    let mut comp = Lane::with_purpose(gpu, StreamPurpose::Compute)?;
    let mut down = Lane::with_purpose(gpu, StreamPurpose::Download)?;
    let mut x = DeviceBuffer::<f32>::zeroed(&mut up, N)?;
    let mut y = DeviceBuffer::<f32>::zeroed(&mut comp, N)?;
    // SAFETY: as in prism_coordinator: the raw streams only get the hold.
    let raw: Vec<Arc<CudaStream>> = [&up, &comp, &down]
        .iter()
        .map(|l| Arc::clone(unsafe { l.cuda_stream() }))
        .collect();
    let refs: Vec<&CudaStream> = raw.iter().map(|s| &**s).collect();
    timed(gpu, regime, &refs, || {
        let mut last = None;
        for _ in 0..ITERS {
            if let Some(f) = &last {
                up.wait_for(f)?;
            }
            let fu = up.copy_htod(&src, 0, &mut x, 0, N)?;
            comp.wait_for(&fu)?;
            let mut l = comp.launch();
            l.fma_chain(&x, &mut y, N, 1.0, 0.5, 1)?;
            let fk = l
                .last_fence()
                .cloned()
                .ok_or(Error::ZeroLength { what: "launch" })?;
            down.wait_for(&fk)?;
            last = Some(down.copy_dtoh(&y, 0, &mut dst, 0, N)?);
        }
        Ok(())
    })
}

/// The same work on cudarc alone: event tracking off (on a context handle
/// of its own), plain slices of pinned memory, a fresh event per record.
fn cudarc_round(gpu: &Gpu, regime: Regime) -> Result<Round, Error> {
    let ctx = &CudaContext::new(gpu.info().ordinal).map_err(drv)?;
    // SAFETY: right after the handle is made, before it allocates: this loop
    // orders its own work (one stream per step, an event between steps) and
    // synchronises before anything is freed.
    unsafe { ctx.disable_event_tracking() };
    let up: Arc<CudaStream> = ctx.new_stream().map_err(drv)?;
    let comp = ctx.new_stream().map_err(drv)?;
    let down = ctx.new_stream().map_err(drv)?;
    // SAFETY: written in full by `copy_from_slice` below before anything
    // reads it; no reference to the uninitialised memory is read.
    let mut src = unsafe { ctx.alloc_pinned_with_flags::<f32>(N, 0) }.map_err(drv)?;
    src.as_mut_slice()
        .map_err(drv)?
        .copy_from_slice(&random_f32(1, N));
    // SAFETY: only ever written (by the GPU's copies), never read.
    let mut dst = unsafe { ctx.alloc_pinned_with_flags::<f32>(N, 0) }.map_err(drv)?;
    let mut x = up.alloc_zeros::<f32>(N).map_err(drv)?;
    let y = comp.alloc_zeros::<f32>(N).map_err(drv)?;
    let events = (0..3 * ITERS)
        .map(|_| ctx.new_event(None))
        .collect::<Result<Vec<_>, _>>()
        .map_err(drv)?;
    let host_src: &[f32] = src.as_slice().map_err(drv)?;
    let host_dst: &mut [f32] = dst.as_mut_slice().map_err(drv)?;
    timed(gpu, regime, &[&up, &comp, &down], || {
        for (i, ev) in events.chunks_exact(3).enumerate() {
            let (e_up, e_k, e_down) = (&ev[0], &ev[1], &ev[2]);
            if i > 0 {
                up.wait(&events[3 * i - 1]).map_err(drv)?;
            }
            up.memcpy_htod(host_src, &mut x).map_err(drv)?;
            e_up.record(&up).map_err(drv)?;
            comp.wait(e_up).map_err(drv)?;
            let xp = x.device_ptr(&comp).0;
            let yp = y.device_ptr(&comp).0;
            // SAFETY: x and y hold N f32 each and live until the synchronize in `timed`.
            unsafe { launch_fma(xp, yp, &comp) }?;
            e_k.record(&comp).map_err(drv)?;
            down.wait(e_k).map_err(drv)?;
            down.memcpy_dtoh(&y, host_dst).map_err(drv)?;
            e_down.record(&down).map_err(drv)?;
        }
        Ok(())
    })
}

/// The baselines' kernel: `y = fma(x, 1.0, 0.5)` over N f32 on `stream`.
///
/// # Safety
/// `x` and `y` must be device allocations of at least N f32 in the current
/// context that stay allocated until the launch completes.
unsafe fn launch_fma(
    x: sys::CUdeviceptr,
    y: sys::CUdeviceptr,
    stream: &CudaStream,
) -> Result<(), Error> {
    if !prism_cuda_sys::KERNELS_BUILT {
        let (mut x, mut y, mut begin, mut n) = (x, y, 0u64, N as u64);
        let (mut a, mut b, mut iters) = (1.0f32, 0.5f32, 1i32);
        let mut params: [*mut std::ffi::c_void; 7] = [
            (&mut x as *mut u64).cast(),
            (&mut y as *mut u64).cast(),
            (&mut begin as *mut u64).cast(),
            (&mut n as *mut u64).cast(),
            (&mut a as *mut f32).cast(),
            (&mut b as *mut f32).cast(),
            (&mut iters as *mut i32).cast(),
        ];
        let grid = (N as u32).div_ceil(256);
        // SAFETY: the scalar fma kernel's parameters (x, y, begin, n, a, b,
        // iters); the caller guarantees both allocations of N floats.
        let code =
            unsafe { ptx_launch(stream, "prism_k_fma_chain_scalar", grid, 256, &mut params) }?;
        debug_assert_eq!(code, 0);
        return Ok(());
    }
    // SAFETY: the caller guarantees both allocations; the stream is live (borrowed).
    let code = unsafe {
        prism_cuda_sys::prism_fma_chain_f32(
            x as *const f32,
            y as *mut f32,
            N as u64,
            1.0,
            0.5,
            1,
            stream.cu_stream().cast(),
        )
    };
    if code != 0 {
        return Err(Error::Kernel {
            kernel: "fma_chain",
            code,
            message: "launch failed".into(),
        });
    }
    Ok(())
}

/// A build without nvcc has no launchers: the plain-cudarc side then
/// launches prism's kernels from prism-cuda-sys's PTX itself, as a cudarc
/// program would (the module is loaded once into the stream's context).
///
/// # Safety
///
/// `params` must match the kernel's parameters, and every buffer they name
/// must stay valid until the launch completes.
unsafe fn ptx_launch(
    stream: &CudaStream,
    name: &str,
    grid: u32,
    block: u32,
    params: &mut [*mut std::ffi::c_void],
) -> Result<i32, Error> {
    const NAMES: [&str; 2] = ["prism_k_spin_ns", "prism_k_fma_chain_scalar"];
    /// (the context loaded into, the module, its two kernels)
    type Loaded = (usize, Arc<CudaModule>, [CudaFunction; 2]);
    static KERNELS: std::sync::OnceLock<Loaded> = std::sync::OnceLock::new();
    let (ctx, _, functions) = match KERNELS.get() {
        Some(k) => k,
        None => {
            let m = stream
                .context()
                .load_module(Ptx::from_src(prism_cuda_sys::KERNELS_PTX))
                .map_err(drv)?;
            let spin = m.load_function(NAMES[0]).map_err(drv)?;
            let fma = m.load_function(NAMES[1]).map_err(drv)?;
            let ctx = stream.context().cu_ctx() as usize;
            KERNELS.get_or_init(|| (ctx, m, [spin, fma]))
        }
    };
    let f = &functions[NAMES
        .iter()
        .position(|n| *n == name)
        .expect("a kernel of NAMES")];
    if *ctx != stream.context().cu_ctx() as usize {
        // The example has one context; the module was loaded into it.
        return Err(Error::WrongContext {
            what: "example kernel (loaded into another context)",
        });
    }
    // SAFETY: forwarded from the caller; `f` is of the stream's context.
    unsafe {
        result::launch_kernel(
            f.cu_function(),
            (grid, 1, 1),
            (block, 1, 1),
            0,
            stream.cu_stream(),
            params,
        )
    }
    .map_err(drv)?;
    Ok(0)
}

/// The floor: the nine driver calls per iteration and nothing else.
fn raw_round(gpu: &Gpu, regime: Regime) -> Result<Round, Error> {
    let ctx = gpu.cuda_context();
    let (up, comp, down) = (
        ctx.new_stream().map_err(drv)?,
        ctx.new_stream().map_err(drv)?,
        ctx.new_stream().map_err(drv)?,
    );
    let src = PinnedBuffer::from_slice(gpu, &random_f32(1, N), HostAllocFlags::DEFAULT)?;
    let mut dst = PinnedBuffer::<f32>::new(gpu, N, HostAllocFlags::DEFAULT)?;
    let mut lane = Lane::new(gpu)?;
    let x = DeviceBuffer::<f32>::zeroed(&mut lane, N)?;
    let y = DeviceBuffer::<f32>::zeroed(&mut lane, N)?;
    lane.synchronize()?;
    let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
    let mut events = Vec::with_capacity(3 * ITERS);
    for _ in 0..3 * ITERS {
        match result::event::create(flags) {
            Ok(e) => events.push(e),
            Err(e) => {
                events.into_iter().for_each(release);
                return Err(drv(e));
            }
        }
    }
    let host_src = src.as_slice()?.as_ptr();
    let host_dst = dst.as_mut_slice()?.as_mut_ptr();
    // SAFETY: the raw driver loop below is this floor's whole point: x and
    // y are idle (synchronised above), used only by it, and outlive it.
    let (xp, yp) = unsafe { (x.device_ptr(), y.device_ptr()) };
    let wait = sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT;
    let round = timed(gpu, regime, &[&up, &comp, &down], || {
        for (i, ev) in events.chunks_exact(3).enumerate() {
            let (e_up, e_k, e_down) = (ev[0], ev[1], ev[2]);
            // SAFETY: all handles are live and of the current context; src,
            // dst, x and y hold N f32 and are neither touched by the host nor
            // freed until the synchronize in `timed` (which runs even when
            // this loop fails).
            unsafe {
                if i > 0 {
                    let prev_down = events[3 * i - 1];
                    result::stream::wait_event(up.cu_stream(), prev_down, wait).map_err(drv)?;
                }
                let s = std::slice::from_raw_parts(host_src, N);
                result::memcpy_htod_async(xp, s, up.cu_stream()).map_err(drv)?;
                result::event::record(e_up, up.cu_stream()).map_err(drv)?;
                result::stream::wait_event(comp.cu_stream(), e_up, wait).map_err(drv)?;
                launch_fma(xp, yp, &comp)?;
                result::event::record(e_k, comp.cu_stream()).map_err(drv)?;
                result::stream::wait_event(down.cu_stream(), e_k, wait).map_err(drv)?;
                let d = std::slice::from_raw_parts_mut(host_dst, N);
                result::memcpy_dtoh_async(d, yp, down.cu_stream()).map_err(drv)?;
                result::event::record(e_down, down.cu_stream()).map_err(drv)?;
            }
        }
        Ok(())
    });
    events.into_iter().for_each(release);
    round
}

/// Host ns per call of single operations, GPU idle.
fn micro(gpu: &Gpu) -> Result<(), Error> {
    const CALLS: usize = 20_000;
    let mut lane = Lane::new(gpu)?;
    // SAFETY: the raw streams get only events and waits, no prism buffer.
    let s = Arc::clone(unsafe { lane.cuda_stream() });
    let s2 = gpu.cuda_context().new_stream().map_err(drv)?;
    let ev = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(drv)?;
    let per_call = |f: &mut dyn FnMut() -> Result<(), Error>| -> Result<f64, Error> {
        for _ in 0..CALLS / 10 {
            f()?;
        }
        gpu.synchronize()?;
        let t = Instant::now();
        for _ in 0..CALLS {
            f()?;
        }
        let ns = t.elapsed().as_secs_f64() * 1e9 / CALLS as f64;
        gpu.synchronize()?;
        Ok(ns)
    };
    let mut rows: Vec<(&str, f64)> = Vec::new();
    rows.push(("Gpu::bind (cuCtxGetCurrent)", per_call(&mut || gpu.bind())?));
    rows.push((
        "cuEventRecord (raw)",
        per_call(&mut || {
            // SAFETY: live event and stream of the current context.
            unsafe { result::event::record(ev, s.cu_stream()) }.map_err(drv)
        })?,
    ));
    rows.push((
        "pooled fence: record + drop",
        per_call(&mut || lane.fence().map(drop))?,
    ));
    rows.push((
        "cuStreamWaitEvent (raw)",
        per_call(&mut || {
            // SAFETY: live event and streams of the current context.
            unsafe {
                result::stream::wait_event(
                    s2.cu_stream(),
                    ev,
                    sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
            }
            .map_err(drv)
        })?,
    ));
    // SAFETY: as above.
    unsafe { result::event::record(ev, s.cu_stream()) }.map_err(drv)?;
    gpu.synchronize()?;
    rows.push((
        "cuEventQuery, complete (raw)",
        per_call(&mut || {
            // SAFETY: live event.
            unsafe { result::event::query(ev) }.map_err(drv)
        })?,
    ));
    let (hold_stream, hold_ev) = hold(gpu.cuda_context(), &[&s])?;
    // SAFETY: as above; `s` is held, so this event stays pending.
    unsafe { result::event::record(ev, s.cu_stream()) }.map_err(drv)?;
    let t = Instant::now();
    let mut pending = 0;
    for _ in 0..CALLS {
        // SAFETY: live event.
        if unsafe { result::event::query(ev) }.is_err() {
            pending += 1;
        }
    }
    rows.push((
        "cuEventQuery, pending (raw)",
        t.elapsed().as_secs_f64() * 1e9 / CALLS as f64,
    ));
    // A trace span that the subscriber's filter leaves out (as it does unless
    // RUST_LOG enables trace for this example): the cost of a disabled span.
    let span = per_call(&mut || {
        let _g = tracing::trace_span!("prism.bench").entered();
        Ok(())
    })?;
    rows.push(("tracing span, filtered out", span));
    gpu.synchronize()?;
    drop(hold_stream);
    release(hold_ev);
    release(ev);
    for (what, ns) in rows {
        println!("prism coordinator_overhead: single call  {what:<32} {ns:>8.1} ns");
    }
    if pending != CALLS {
        println!(
            "prism coordinator_overhead: (the pending query row saw {pending} of {CALLS} pending)"
        );
    }
    Ok(())
}
