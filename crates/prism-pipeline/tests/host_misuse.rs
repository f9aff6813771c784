//! Misuse of the host backend: each case gets a typed error, not a panic,
//! a hang or a silent change (an unknown stage in the order, an item too
//! long for a chunk, a chunk size that is not whole elements, a refused
//! configuration, a failed run's stats).

use prism_pipeline::{
    AsyncPipelineCoordinator, Error, Fma, HostFn, PipelineConfig, PipelineStats, Stage,
};
use prism_testing::random_f32;

mod common;
use common::host;

#[test]
fn coordinator_rejects_an_order_naming_a_missing_stage() {
    let stages: Vec<Box<dyn Stage<f32>>> = vec![Box::new(Fma {
        a: 1.0,
        b: 0.0,
        iters: 1,
    })];
    let c = AsyncPipelineCoordinator::new(3).unwrap();
    let input = random_f32(1, 100);
    let r = c.run(
        &stages,
        &[5],
        input.chunks(10),
        |_, _| Ok(()),
        &mut PipelineStats::default(),
    );
    assert!(
        matches!(r, Err(Error::UnknownStage { index: 5, count: 1 })),
        "{r:?}"
    );
}

#[test]
fn host_items_longer_than_a_chunk_are_refused_as_on_the_gpu() {
    let mut p = host(16, 3);
    p.add_stage(Fma {
        a: 1.0,
        b: 0.0,
        iters: 1,
    });
    let long = random_f32(2, 17);
    let mut out = [0.0; 17];
    let r = p.run_items([(&long[..], &mut out[..])]);
    assert!(
        matches!(
            r,
            Err(Error::ItemTooLong {
                item: 0,
                len: 17,
                chunk: 16
            })
        ),
        "{r:?}"
    );
}

#[test]
fn chunk_bytes_not_a_multiple_of_the_element_size_is_a_config_error() {
    let config = PipelineConfig {
        chunk_bytes: 4 * 1000 + 2,
        ..PipelineConfig::default()
    };
    let r = prism_pipeline::PipelineStageManager::<f32>::new(prism_pipeline::Backend::Host, config);
    assert!(matches!(r, Err(Error::Config(_))), "{:?}", r.err());
}

#[test]
fn a_failed_run_adds_nothing_to_the_stats() {
    let mut p = host(100, 3);
    p.add_stage(HostFn::new(
        "fails on chunk 3",
        true,
        |i: &[f32], o: &mut [f32]| {
            if i[0].is_nan() {
                return Err("nan".into());
            }
            o.copy_from_slice(i);
            Ok(())
        },
    ));
    let mut input = random_f32(3, 1000);
    let mut out = vec![0.0; 1000];
    p.run(&input, &mut out).unwrap();
    let before = p.get_stats().clone();
    input[350] = f32::NAN;
    input[300] = f32::NAN;
    assert!(p.run(&input, &mut out).is_err());
    let after = p.get_stats();
    assert_eq!(after.runs, before.runs, "a failed run is not a run");
    assert_eq!(after.bytes_in, before.bytes_in);
    assert_eq!(after.bytes_out, before.bytes_out);
    assert_eq!(after.stages, before.stages, "stage times of a failed run");
    assert_eq!(after.compute_busy_ms, before.compute_busy_ms);
}

#[test]
fn set_config_makes_the_checks_new_makes_and_keeps_the_old_one_on_error() {
    let mut p = host(16, 3);
    let before = p.config().clone();
    for bad in [
        PipelineConfig {
            slots: 1,
            ..before.clone()
        },
        PipelineConfig {
            slots: 9,
            ..before.clone()
        },
        PipelineConfig {
            chunk_bytes: 6, // not a multiple of 4
            ..before.clone()
        },
        PipelineConfig {
            chunk_bytes: 2, // less than one element
            ..before.clone()
        },
        PipelineConfig {
            host_threads: 0,
            ..before.clone()
        },
    ] {
        assert!(
            matches!(p.set_config(bad.clone()), Err(Error::Config(_))),
            "{bad:?} was accepted"
        );
        assert_eq!(p.config(), &before, "a refused configuration changed it");
    }
}
