//! Resident state (issue #21): `ResidentPipeline`, stages iterated over
//! data kept on the GPU, with and without CUDA graphs, against a CPU
//! reference bit for bit; and streamed stages that own device buffers (a
//! lookup table uploaded once, an accumulator), read back after two runs.
//! GPU-gated.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prism_pipeline::{
    Clamp, Error, Fma, GpuPipelineExt, GroupSum, PipelineConfig, PipelineStageManager,
    ResidentConfig, ResidentPipeline, Stage, StageError,
};
use prism_stream::cudarc::driver::LaunchConfig;
use prism_stream::cudarc::nvrtc::Ptx;
use prism_stream::{DeviceBuffer, Gpu, Kernel, Lane, Launch};
use prism_testing::{bits, gpu_or_skip, random_f32, scaled};

// The iteration: x -> y = fma(x, A, B) -> y = clamp(y) -> x = y, and
// r = the sums of 64 equal parts of y (read back).
const A: f32 = -1.3;
const B: f32 = 0.1;
const LO: f32 = -1.0;
const HI: f32 = 1.0;
const PARTS: usize = 64;

/// The resident state of the test iteration.
struct State {
    x: DeviceBuffer<f32>,
    y: DeviceBuffer<f32>,
    r: DeviceBuffer<f32>,
}

fn state(lane: &mut Lane, data: &[f32]) -> Result<State, StageError> {
    Ok(State {
        x: DeviceBuffer::from_slice(lane, data)?,
        y: DeviceBuffer::zeroed(lane, data.len())?,
        r: DeviceBuffer::zeroed(lane, PARTS)?,
    })
}

/// The three stages and the read-back of `r`; returns their indices.
fn add_stages(p: &mut ResidentPipeline<State>) -> [usize; 3] {
    let scale = p.add_stage("scale", |l: &mut Launch<'_>, s: &mut State| {
        let n = s.x.len();
        l.fma_chain(&s.x, &mut s.y, n, A, B, 1)?;
        Ok(())
    });
    let clamp = p.add_stage("clamp", |l: &mut Launch<'_>, s: &mut State| {
        let n = s.y.len();
        l.clamp_in_place(&mut s.y, n, LO, HI)?;
        Ok(())
    });
    let back = p.add_stage("back", |l: &mut Launch<'_>, s: &mut State| {
        let n = s.y.len();
        l.copy_dtod(&s.y, 0, &mut s.x, 0, n)?;
        l.group_sum(&s.y, n, (n / PARTS) as u32, &mut s.r)?;
        Ok(())
    });
    p.set_readback(|s: &State| (&s.r, 0..PARTS));
    [scale, clamp, back]
}

/// One iteration on the CPU (the stages' host forms, bit for bit the
/// kernels): updates `x`, returns the read-back.
fn cpu_iteration(x: &mut [f32]) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    Fma {
        a: A,
        b: B,
        iters: 1,
    }
    .host(x, &mut y)
    .unwrap();
    let mut z = vec![0.0; x.len()];
    Clamp { lo: LO, hi: HI }.host(&y, &mut z).unwrap();
    x.copy_from_slice(&z);
    let mut r = vec![0.0; PARTS];
    GroupSum {
        group: (x.len() / PARTS) as u32,
    }
    .host(&z, &mut r)
    .unwrap();
    r
}

fn read_all(gpu: &Gpu, buf: &DeviceBuffer<f32>) -> Vec<f32> {
    let mut lane = Lane::new(gpu).unwrap();
    lane.read_async(buf, 0, buf.len()).unwrap().wait().unwrap()
}

#[test]
fn gpu_resident_iterations_match_the_cpu_with_and_without_graphs() {
    let Some(ctx) = gpu_or_skip("gpu_resident_iterations_match_the_cpu_with_and_without_graphs")
    else {
        return;
    };
    let n = scaled(1 << 16, 1 << 10);
    let iterations = scaled(40, 6);
    let data = random_f32(31, n);
    let mut finals = Vec::new();
    for graphs in [true, false] {
        let config = ResidentConfig {
            graphs,
            timing: true,
        };
        let mut p: ResidentPipeline<State> = ctx
            .create_resident_pipeline(config, |lane| state(lane, &data))
            .unwrap();
        add_stages(&mut p);
        assert_eq!(p.stage_names(), ["scale", "clamp", "back"]);
        let mut want = data.clone();
        for k in 0..iterations {
            let it = p.execute_iteration().unwrap();
            assert_eq!(it.index(), k as u64);
            assert_eq!(it.from_graph(), graphs);
            let got = it.wait().unwrap();
            let r = cpu_iteration(&mut want);
            assert_eq!(
                bits(&got),
                bits(&r),
                "graphs {graphs}: read-back of iteration {k}"
            );
        }
        // A single value, read on the pipeline's reading lane.
        let last = p.read_value(|s| &s.x, n - 1).unwrap();
        assert_eq!(last.to_bits(), want[n - 1].to_bits());
        p.synchronize().unwrap();
        let stats = p.get_stats().clone();
        assert_eq!(stats.iterations, iterations as u64);
        assert_eq!(stats.timed_iterations, iterations as u64, "{stats}");
        assert!(stats.gpu_ms > 0.0 && stats.host_ms > 0.0, "{stats}");
        assert_eq!(stats.capture_refusals, 0);
        if graphs {
            assert_eq!(stats.captures, 1, "{stats}");
            assert_eq!(stats.replayed, iterations as u64 - 1, "{stats}");
            assert!(stats.stages.is_empty(), "a graph is timed as a whole");
        } else {
            assert_eq!((stats.captures, stats.replayed), (0, 0), "{stats}");
            let names: Vec<&str> = stats.stages.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names, ["scale", "clamp", "back"], "{stats}");
        }
        println!("{stats}");
        let gpu = p.gpu().clone();
        let s = p.into_state().unwrap();
        let x = read_all(&gpu, &s.x);
        assert_eq!(bits(&x), bits(&want), "graphs {graphs}: the resident x");
        finals.push(x);
    }
    assert_eq!(
        bits(&finals[0]),
        bits(&finals[1]),
        "graphs on and off differ"
    );
}

#[test]
fn gpu_resident_graph_is_captured_again_after_each_change() {
    let Some(ctx) = gpu_or_skip("gpu_resident_graph_is_captured_again_after_each_change") else {
        return;
    };
    let gpu = ctx.gpu();
    let n = scaled(1 << 14, 1 << 10);
    let data = random_f32(32, n);
    let mut p =
        ResidentPipeline::new(gpu, ResidentConfig::default(), |lane| state(lane, &data)).unwrap();
    let [scale, clamp, back] = add_stages(&mut p);
    let mut want = data.clone();
    let step = |p: &mut ResidentPipeline<State>, want: &mut Vec<f32>| {
        let got = p.execute_iteration().unwrap().wait().unwrap();
        let r = cpu_iteration(want);
        assert_eq!(bits(&got), bits(&r));
    };
    for _ in 0..3 {
        step(&mut p, &mut want);
    }
    let counts = |p: &mut ResidentPipeline<State>| {
        let s = p.get_stats();
        (s.captures, s.replayed)
    };
    assert_eq!(counts(&mut p), (1, 2));
    // New data in a new buffer: the old graph would still read the old one.
    let fresh = random_f32(33, n);
    let mut lane = Lane::new(gpu).unwrap();
    p.state_mut().x = DeviceBuffer::from_slice(&mut lane, &fresh).unwrap();
    want = fresh;
    for _ in 0..2 {
        step(&mut p, &mut want);
    }
    assert_eq!(counts(&mut p), (2, 3), "state_mut");
    // Each change makes the next iteration capture, then replay.
    p.set_order(&[scale, clamp, back]).unwrap();
    step(&mut p, &mut want);
    step(&mut p, &mut want);
    assert_eq!(counts(&mut p), (3, 4), "set_order");
    p.invalidate_graph();
    step(&mut p, &mut want);
    assert_eq!(counts(&mut p), (4, 4), "invalidate_graph");
    p.set_readback(|s: &State| (&s.r, 1..3));
    let two = p.execute_iteration().unwrap().wait().unwrap();
    let r = cpu_iteration(&mut want);
    assert_eq!(bits(&two), bits(&r[1..3]), "the new read-back range");
    assert_eq!(counts(&mut p), (5, 4), "set_readback");
    let extra = p.add_stage("clamp again", |l: &mut Launch<'_>, s: &mut State| {
        let n = s.x.len();
        l.clamp_in_place(&mut s.x, n, LO, HI)?;
        Ok(())
    });
    p.execute_iteration().unwrap().wait().unwrap();
    assert_eq!(counts(&mut p), (6, 4), "add_stage");
    // A smaller order, replayed: only the stages named run.
    p.set_order(&[extra]).unwrap();
    for _ in 0..3 {
        p.execute_iteration().unwrap().wait().unwrap();
    }
    assert_eq!(counts(&mut p), (7, 6));
    // Orders are checked as the streaming pipeline checks them.
    assert!(matches!(
        p.set_order(&[9]),
        Err(Error::UnknownStage { index: 9, count: 4 })
    ));
    assert!(matches!(
        p.set_order(&[0, 0]),
        Err(Error::RepeatedStage { index: 0 })
    ));
    assert!(matches!(p.set_order(&[]), Err(Error::NoStages)));
}

#[test]
fn gpu_resident_iterations_in_flight_come_back_in_order() {
    let Some(ctx) = gpu_or_skip("gpu_resident_iterations_in_flight_come_back_in_order") else {
        return;
    };
    let n = scaled(1 << 16, 1 << 10);
    let iterations = scaled(64, 12);
    let data = random_f32(34, n);
    for graphs in [true, false] {
        let config = ResidentConfig {
            graphs,
            timing: !graphs,
        };
        let mut p = ResidentPipeline::new(ctx.gpu(), config, |lane| state(lane, &data)).unwrap();
        add_stages(&mut p);
        let mut want = data.clone();
        let mut wants = VecDeque::new();
        let mut in_flight = VecDeque::new();
        let check = |it: prism_pipeline::Iteration<f32>, r: Vec<f32>| {
            let index = it.index();
            let got = it.wait().unwrap();
            assert_eq!(bits(&got), bits(&r), "graphs {graphs}: iteration {index}");
        };
        for _ in 0..iterations {
            in_flight.push_back(p.execute_iteration().unwrap());
            wants.push_back(cpu_iteration(&mut want));
            // Four iterations queued: read the oldest, after the newer ones
            // were queued (their read-backs are slots of their own).
            if in_flight.len() == 4 {
                check(in_flight.pop_front().unwrap(), wants.pop_front().unwrap());
            }
        }
        while let Some(it) = in_flight.pop_front() {
            check(it, wants.pop_front().unwrap());
        }
        // try_get: None or the values, never blocking; the values once done.
        let it = p.execute_iteration().unwrap();
        let r = cpu_iteration(&mut want);
        let got = loop {
            if let Some(v) = it.try_get().unwrap() {
                break v;
            }
            std::thread::yield_now();
        };
        assert!(it.is_ready().unwrap());
        assert_eq!(bits(&got), bits(&r));
        assert_eq!(it.wait_value().unwrap().to_bits(), r[0].to_bits());
        let s = p.get_stats();
        assert_eq!(s.iterations, iterations as u64 + 1);
        if graphs {
            assert_eq!((s.captures, s.replayed), (1, iterations as u64));
        }
    }
}

#[test]
fn gpu_resident_errors_are_typed_and_name_the_stage() {
    let Some(ctx) = gpu_or_skip("gpu_resident_errors_are_typed_and_name_the_stage") else {
        return;
    };
    let gpu = ctx.gpu();
    let data = random_f32(35, 1024);
    // The state's initialiser.
    let init = ResidentPipeline::<State>::new(gpu, ResidentConfig::default(), |_| {
        Err("no input file".into())
    });
    assert!(
        matches!(&init, Err(Error::ResidentInit { source }) if source.to_string() == "no input file"),
        "{init:?}"
    );
    for graphs in [true, false] {
        let config = ResidentConfig {
            graphs,
            timing: true,
        };
        let mut p = ResidentPipeline::new(gpu, config, |lane| state(lane, &data)).unwrap();
        assert!(matches!(p.execute_iteration(), Err(Error::NoStages)));
        let [scale, ..] = add_stages(&mut p);
        let bad = p.add_stage(
            "bad",
            |_: &mut Launch<'_>, _: &mut State| Err("boom".into()),
        );
        let oob = p.add_stage("out of bounds", |l: &mut Launch<'_>, s: &mut State| {
            let n = s.x.len();
            l.fma_chain(&s.x, &mut s.y, n + 1, 1.0, 0.0, 1)?;
            Ok(())
        });
        let panics = p.add_stage("panics", |_: &mut Launch<'_>, _: &mut State| {
            panic!("a stage panicked on purpose")
        });
        for (stage, name, text) in [
            (bad, "bad", "boom"),
            (oob, "out of bounds", "length mismatch"),
            (panics, "panics", "panicked: a stage panicked on purpose"),
        ] {
            p.set_order(&[scale, stage]).unwrap();
            // Twice: a failed capture is tried again (and fails again).
            for _ in 0..2 {
                match p.execute_iteration() {
                    Err(Error::ResidentStage { stage, source, .. }) => {
                        assert_eq!(stage, name);
                        assert!(source.to_string().contains(text), "{source}");
                    }
                    other => panic!("graphs {graphs}, stage {name}: {other:?}"),
                }
            }
        }
        // A prism error keeps its type inside the stage error.
        p.set_order(&[oob]).unwrap();
        match p.execute_iteration() {
            Err(Error::ResidentStage { source, .. }) => assert!(matches!(
                source.downcast_ref::<prism_stream::Error>(),
                Some(prism_stream::Error::LengthMismatch { .. })
            )),
            other => panic!("{other:?}"),
        }
        // Without the failing stages the pipeline runs again.
        p.set_order(&[scale]).unwrap();
        p.execute_iteration().unwrap().wait().unwrap();
        assert_eq!(p.get_stats().captures, u64::from(graphs));
        // No read-back: wait gives nothing, wait_value is an error.
        let mut q = ResidentPipeline::<State>::new(gpu, config, |lane| state(lane, &data)).unwrap();
        q.add_stage("scale", |l: &mut Launch<'_>, s: &mut State| {
            let n = s.x.len();
            l.fma_chain(&s.x, &mut s.y, n, A, B, 1)?;
            Ok(())
        });
        assert!(q.execute_iteration().unwrap().wait().unwrap().is_empty());
        assert!(matches!(
            q.execute_iteration().unwrap().wait_value(),
            Err(Error::NoReadback)
        ));
        // A read-back range past the buffer is prism-stream's error.
        q.set_readback(|s: &State| (&s.r, PARTS - 2..PARTS + 5));
        assert!(matches!(
            q.execute_iteration(),
            Err(Error::Stream(prism_stream::Error::LengthMismatch { .. }))
        ));
    }
}

#[test]
fn gpu_resident_capture_refused_runs_without_a_graph() {
    let Some(ctx) = gpu_or_skip("gpu_resident_capture_refused_runs_without_a_graph") else {
        return;
    };
    let n = scaled(1 << 14, 1 << 10);
    let iterations = scaled(10, 4);
    let data = random_f32(36, n);
    let mut p = ResidentPipeline::new(ctx.gpu(), ResidentConfig::default(), |lane| {
        state(lane, &data)
    })
    .unwrap();
    let [_, clamp, back] = add_stages(&mut p);
    // A stage that records a timed fence, which a graph cannot hold.
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let timed = p.add_stage("timed scale", move |l: &mut Launch<'_>, s: &mut State| {
        counted.fetch_add(1, Ordering::Relaxed);
        let _start = l.timed_fence()?;
        let n = s.x.len();
        l.fma_chain(&s.x, &mut s.y, n, A, B, 1)?;
        Ok(())
    });
    p.set_order(&[timed, clamp, back]).unwrap();
    let mut want = data.clone();
    for k in 0..iterations {
        let it = p.execute_iteration().unwrap();
        assert!(!it.from_graph());
        let got = it.wait().unwrap();
        assert_eq!(bits(&got), bits(&cpu_iteration(&mut want)), "iteration {k}");
    }
    // Once for the refused capture, then once per iteration.
    assert_eq!(calls.load(Ordering::Relaxed), iterations + 1);
    p.synchronize().unwrap();
    let s = p.get_stats().clone();
    assert_eq!(
        (s.captures, s.replayed, s.capture_refusals),
        (0, 0, 1),
        "{s}"
    );
    assert!(
        s.refusal
            .as_deref()
            .is_some_and(|r| r.contains("timed fence")),
        "{s}"
    );
    assert_eq!(s.stages.len(), 3, "timed stage by stage without a graph");
    // state_mut does not lift the refusal; invalidate_graph tries again.
    let _ = p.state_mut();
    p.execute_iteration().unwrap().wait().unwrap();
    assert_eq!(p.get_stats().capture_refusals, 1);
    p.invalidate_graph();
    p.execute_iteration().unwrap().wait().unwrap();
    assert_eq!(p.get_stats().capture_refusals, 2);
    assert_eq!(calls.load(Ordering::Relaxed), iterations + 4);
}

/// `table_acc(const float *x, float *y, const float *w, float *acc, u64 n,
/// u64 k)`: `y[i] = x[i] * w[i % k]; acc[i] += y[i]`, rounded step by step.
const TABLE_ACC_PTX: &str = include_str!("../examples/kernels/table_acc.ptx");

/// A streamed stage with resident state: the table `w`, uploaded once, and
/// the accumulator `acc` (one per position in a chunk), added to by every
/// chunk of every run.
struct TableAcc {
    kernel: Kernel,
    w: DeviceBuffer<f32>,
    acc: DeviceBuffer<f32>,
}

impl Stage<f32> for TableAcc {
    fn name(&self) -> &str {
        "table_acc"
    }
    fn has_gpu(&self) -> bool {
        true
    }
    fn gpu(
        &mut self,
        launch: &mut Launch<'_>,
        input: &DeviceBuffer<f32>,
        output: &mut DeviceBuffer<f32>,
        len: usize,
    ) -> Result<(), StageError> {
        if len > self.acc.len() {
            return Err("a chunk longer than the accumulator".into());
        }
        let k = self.w.len() as u64;
        // SAFETY: the arguments match table_acc(const float*, float*,
        // const float*, float*, u64 n, u64 k); input and output hold at
        // least len elements, acc at least len (checked above), w k; the
        // grid covers len and the kernel checks i < n.
        unsafe {
            launch
                .kernel(&self.kernel)
                .arg(input)
                .arg_mut(output)
                .arg(&self.w)
                .arg_mut(&mut self.acc)
                .value(len as u64)
                .value(k)
                .launch(LaunchConfig::for_num_elems(len as u32))
        }?;
        Ok(())
    }
}

#[test]
fn gpu_stage_with_a_resident_table_and_accumulator_keeps_them_across_runs() {
    let Some(ctx) =
        gpu_or_skip("gpu_stage_with_a_resident_table_and_accumulator_keeps_them_across_runs")
    else {
        return;
    };
    let gpu = ctx.gpu();
    let chunk = scaled(1 << 16, 1 << 10);
    let k = 7;
    let config = PipelineConfig {
        chunk_bytes: chunk * 4,
        slots: 3,
        ..PipelineConfig::default()
    };
    let mut p = PipelineStageManager::<f32>::with_gpu(gpu, config).unwrap();
    // The resident state, made once on a lane of the pipeline's GPU.
    let table = random_f32(37, k);
    let mut lane = Lane::new(gpu).unwrap();
    let stage = TableAcc {
        kernel: gpu
            .load_module(Ptx::from_src(TABLE_ACC_PTX))
            .unwrap()
            .kernel("table_acc")
            .unwrap(),
        w: DeviceBuffer::from_slice(&mut lane, &table).unwrap(),
        acc: DeviceBuffer::zeroed(&mut lane, chunk).unwrap(),
    };
    let index = p.add_stage(stage);
    p.add_stage(Fma {
        a: 0.5,
        b: 0.25,
        iters: 1,
    });
    // Two and a half chunks: the last is shorter.
    let input = random_f32(38, chunk * 5 / 2);
    let mut acc = vec![0.0f32; chunk];
    for run in 0..2 {
        let mut out = vec![0.0; input.len()];
        p.run(&input, &mut out).unwrap();
        let mut want = Vec::with_capacity(input.len());
        for c in input.chunks(chunk) {
            for (i, &x) in c.iter().enumerate() {
                let y = x * table[i % k];
                acc[i] += y;
                want.push(y.mul_add(0.5, 0.25));
            }
        }
        assert_eq!(bits(&out), bits(&want), "run {run}: outputs");
        // The accumulator, read through any lane of the GPU: the read waits
        // for the last chunk's kernel, nothing more.
        let st = p.stage::<TableAcc>(index).unwrap();
        let got = lane.read_async(&st.acc, 0, chunk).unwrap().wait().unwrap();
        assert_eq!(bits(&got), bits(&acc), "run {run}: accumulator");
    }
    // stage_mut: reset the accumulator between runs.
    let st = p.stage_mut::<TableAcc>(index).unwrap();
    lane.fill(&mut st.acc, 0, chunk, 0.0f32).unwrap();
    let mut out = vec![0.0; chunk];
    p.run(&input[..chunk], &mut out).unwrap();
    let st = p.stage::<TableAcc>(index).unwrap();
    let got = lane.read_async(&st.acc, 0, chunk).unwrap().wait().unwrap();
    let want: Vec<f32> = input[..chunk]
        .iter()
        .enumerate()
        .map(|(i, &x)| 0.0 + x * table[i % k])
        .collect();
    assert_eq!(bits(&got), bits(&want));
    assert!(p.stage::<Fma>(index).is_none());
}
