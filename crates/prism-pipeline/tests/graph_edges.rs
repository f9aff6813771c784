//! Stage graphs at their edges, on the host backend: a join with an empty
//! input, graphs wider than a GPU slot, node names, a graph without
//! output, tricky shapes (taps on the input, outputs listed twice, dead
//! nodes, ragged group sums) against a reference, and a panicking
//! `output_len`.
use prism_pipeline::{
    Backend, Error, Fma, PipelineConfig, PipelineStageManager, Stage, StageError, StageGraph,
};

fn config(chunk: usize) -> PipelineConfig {
    PipelineConfig {
        chunk_bytes: chunk * 4,
        ..PipelineConfig::default()
    }
}

/// Keeps every 8th element (floor): a tail chunk of < 8 elements makes 0.
struct Decimate8;
impl Stage<f32> for Decimate8 {
    fn name(&self) -> &str {
        "decimate8"
    }
    fn output_len(&self, n: usize) -> usize {
        n / 8
    }
    fn has_host(&self) -> bool {
        true
    }
    fn host(&self, i: &[f32], o: &mut [f32]) -> Result<(), StageError> {
        for (k, v) in o.iter_mut().enumerate() {
            *v = i[k * 8];
        }
        Ok(())
    }
}

/// A join that concatenates its inputs: output_len = sum of the lengths.
fn concat() -> impl prism_pipeline::Join<f32> {
    struct Concat;
    impl prism_pipeline::Join<f32> for Concat {
        fn name(&self) -> &str {
            "concat"
        }
        fn output_len(&self, lens: &[usize]) -> Result<usize, StageError> {
            Ok(lens.iter().sum())
        }
        fn has_host(&self) -> bool {
            true
        }
        fn host(&self, ins: &[&[f32]], out: &mut [f32]) -> Result<(), StageError> {
            let mut at = 0;
            for i in ins {
                out[at..at + i.len()].copy_from_slice(i);
                at += i.len();
            }
            Ok(())
        }
    }
    Concat
}

/// A join is asked its length even when one input is empty for a chunk
/// (a concatenation still has the other input's elements).
#[test]
fn a_join_with_an_empty_input_still_makes_its_output() {
    let chunk = 256;
    let mut m = PipelineStageManager::<f32>::new(Backend::Host, config(chunk)).unwrap();
    let mut g = StageGraph::<f32>::new();
    let x = g.input();
    let d = g.stage(x, Decimate8).unwrap();
    let j = g.join(&[x, d], concat()).unwrap();
    g.output(j).unwrap();
    let n = chunk + 4; // tail chunk of 4 elements: decimate -> 0, concat -> 4 + 0
    let input: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let lens = m.graph_output_lens(&g, n).unwrap();
    // Join::output_len says chunk 0 -> 256 + 32, chunk 1 -> 4 + 0.
    assert_eq!(
        lens,
        vec![256 + 32 + 4],
        "the tail chunk's 4 elements were dropped"
    );
    let mut out = vec![f32::NAN; lens[0]];
    m.run_graph(&mut g, &input, &mut [&mut out[..]]).unwrap();
    let mut want: Vec<f32> = input[..chunk].to_vec();
    want.extend(input[..chunk].iter().step_by(8));
    want.extend(&input[chunk..]);
    assert_eq!(out, want);
}

/// The host backend has no slot buffers: a graph too wide for a GPU slot
/// runs there.
#[test]
fn the_host_runs_graphs_wider_than_a_gpu_slot() {
    let mut m = PipelineStageManager::<f32>::new(Backend::Host, config(256)).unwrap();
    let mut g = StageGraph::<f32>::new();
    let x = g.input();
    for i in 0..16 {
        let b = g
            .stage(
                x,
                Fma {
                    a: i as f32,
                    b: 0.0,
                    iters: 1,
                },
            )
            .unwrap();
        g.output(b).unwrap();
    }
    let input = vec![1.0f32; 1000];
    let mut outs: Vec<Vec<f32>> = (0..16).map(|_| vec![0.0; 1000]).collect();
    let mut dsts: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
    let r = m.run_graph(&mut g, &input, &mut dsts);
    assert!(r.is_ok(), "host run refused: {r:?}");
}

/// Node names are unique in a graph (stats key on them), even against a
/// name that looks like a renamed one.
#[test]
fn node_names_stay_unique() {
    let mut g = StageGraph::<f32>::new();
    let x = g.input();
    let named = |n: &'static str| {
        prism_pipeline::HostFn::new(n, true, |i: &[f32], o: &mut [f32]| {
            o.copy_from_slice(i);
            Ok(())
        })
    };
    let a = g.stage(x, named("a")).unwrap();
    let b = g.stage(a, named("a (node 3)")).unwrap();
    let c = g.stage(b, named("a")).unwrap();
    assert_ne!(g.name(b).unwrap(), g.name(c).unwrap());
}

/// A graph with no output: the error says so.
#[test]
fn a_graph_without_output_says_so() {
    let mut m = PipelineStageManager::<f32>::new(Backend::Host, config(256)).unwrap();
    let mut g = StageGraph::<f32>::new();
    let x = g.input();
    g.stage(
        x,
        Fma {
            a: 1.0,
            b: 0.0,
            iters: 1,
        },
    )
    .unwrap();
    let e = m.run_graph(&mut g, &[1.0; 10], &mut []).unwrap_err();
    assert!(matches!(e, Error::NoOutputs), "{e}");
    assert!(e.to_string().contains("output"), "{e}");
}

/// Tricky shapes on the host: a tap on the input, an output listed twice,
/// an output read later by a join that reads it twice, a dead node, a
/// GroupSum with ragged tails, checked against a per-chunk reference.
#[test]
fn tricky_shapes_match_a_reference() {
    use prism_pipeline::{GroupSum, HostJoinFn};
    for chunk in [1usize, 3, 7, 256] {
        let mut m = PipelineStageManager::<f32>::new(Backend::Host, config(chunk)).unwrap();
        let mut g = StageGraph::<f32>::new();
        let x = g.input();
        let a = g
            .stage(
                x,
                Fma {
                    a: 2.0,
                    b: 1.0,
                    iters: 1,
                },
            )
            .unwrap();
        let _dead = g
            .stage(
                a,
                Fma {
                    a: 9.0,
                    b: 9.0,
                    iters: 1,
                },
            )
            .unwrap();
        let j = g
            .join(
                &[a, a, x],
                HostJoinFn::new("sum3", true, |ins: &[&[f32]], o: &mut [f32]| {
                    for (i, v) in o.iter_mut().enumerate() {
                        *v = ins[0][i] + ins[1][i] + ins[2][i];
                    }
                    Ok(())
                }),
            )
            .unwrap();
        let s = g.stage(j, GroupSum { group: 3 }).unwrap();
        g.output(x).unwrap();
        g.output(a).unwrap();
        g.output(s).unwrap();
        g.output(a).unwrap();
        g.output(x).unwrap();
        for n in [0usize, 1, 5, 300, 1000] {
            let input: Vec<f32> = (0..n).map(|i| (i % 17) as f32).collect();
            let mut want: Vec<Vec<f32>> = vec![Vec::new(); 5];
            for c in input.chunks(chunk) {
                let av: Vec<f32> = c.iter().map(|&v| v.mul_add(2.0, 1.0)).collect();
                let jv: Vec<f32> = av.iter().zip(c).map(|(&p, &q)| p + p + q).collect();
                let sv: Vec<f32> = jv.chunks(3).map(|g| g.iter().sum()).collect();
                want[0].extend(c);
                want[1].extend(&av);
                want[2].extend(&sv);
                want[3].extend(&av);
                want[4].extend(c);
            }
            let lens = m.graph_output_lens(&g, n).unwrap();
            assert_eq!(lens, want.iter().map(Vec::len).collect::<Vec<_>>());
            let mut outs: Vec<Vec<f32>> = lens.iter().map(|&l| vec![f32::NAN; l]).collect();
            {
                let mut d: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
                m.run_graph(&mut g, &input, &mut d).unwrap();
            }
            assert_eq!(outs, want, "chunk {chunk}, n {n}");
        }
    }
}

/// An elementwise stage whose output_len panics on a 1-element input: the
/// ramp check takes it as not free of chunk boundaries, and never unwinds
/// into the caller.
#[test]
fn an_output_len_panic_never_unwinds_into_the_caller() {
    struct Picky;
    impl Stage<f32> for Picky {
        fn name(&self) -> &str {
            "picky"
        }
        fn elementwise(&self) -> bool {
            true
        }
        fn output_len(&self, n: usize) -> usize {
            assert!(n.is_multiple_of(4), "picky: {n} not a multiple of 4");
            n
        }
        fn has_host(&self) -> bool {
            true
        }
        fn host(&self, i: &[f32], o: &mut [f32]) -> Result<(), StageError> {
            o.copy_from_slice(i);
            Ok(())
        }
    }
    let m = PipelineStageManager::<f32>::new(Backend::Host, config(1 << 16)).unwrap();
    let mut g = StageGraph::<f32>::new();
    let x = g.input();
    let p = g.stage(x, Picky).unwrap();
    g.output(p).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        m.graph_output_lens(&g, 1 << 20)
    }));
    assert_eq!(r.expect("no unwind").unwrap(), vec![1 << 20]);
    // A length the stage panics on is its typed error.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.graph_output_lens(&g, 3)));
    assert!(matches!(
        r.expect("no unwind"),
        Err(Error::StagePanicked { .. })
    ));
}
