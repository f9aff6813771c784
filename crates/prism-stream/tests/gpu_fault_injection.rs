//! A kernel fault is reported against its op and poisons the context.
//! Its own test binary: a fault leaves the CUDA context unusable for the
//! process. The bundle runs it outside compute-sanitizer (name: fault_injection).
//! Awaited (module `future`), the fault is the op's error too, and a fence
//! of another stream of the dead context fails with `ContextPoisoned`.

use prism_stream::{Error, OpStatus};
use prism_testing::gpu_or_skip;

#[test]
fn gpu_fault_injection_is_reported_against_its_op() {
    let Some(mut ctx) = gpu_or_skip("gpu_fault_injection_is_reported_against_its_op") else {
        return;
    };
    // A second handle on the same (primary) context, opened before the fault.
    let other = prism_stream::Gpu::open(0).unwrap();
    let mut lane = prism_stream::Lane::new(ctx.gpu()).unwrap();
    let c = ctx.async_coordinator_mut().unwrap();
    let mut d = c.zeroed::<u32>(1024).unwrap();
    let ok = c
        .queue_compute("fill", &[], |l| l.fill_pattern(&mut d, 1024, 1))
        .unwrap();
    c.wait(ok).unwrap();
    let bad = c
        .queue_compute("deliberate fault", &[ok], |l| l.fault_injection())
        .unwrap();
    // Still running on another stream when the fault kills the context.
    let mut scope = lane.launch();
    scope.spin(2_000_000_000).unwrap();
    let spinning = scope.last_fence().unwrap().clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    match rt.block_on(c.op_future(bad).unwrap()) {
        Err(Error::OpFailed { op, name, .. }) => {
            assert_eq!(op, bad);
            assert_eq!(name, "deliberate fault");
        }
        r => panic!("awaiting the faulting op: expected OpFailed, got {r:?}"),
    }
    assert!(
        matches!(
            rt.block_on(spinning.completion()),
            Err(Error::ContextPoisoned { .. })
        ),
        "a fence of the dead context resolved without an error"
    );
    let err = c.wait(bad).unwrap_err();
    match &err {
        Error::OpFailed { op, name, reason } => {
            assert_eq!(*op, bad);
            assert_eq!(name, "deliberate fault");
            assert!(
                reason.to_lowercase().contains("illegal") || reason.contains("ILLEGAL"),
                "reason: {reason}"
            );
        }
        other => panic!("expected OpFailed, got {other}"),
    }
    assert!(matches!(c.status(bad).unwrap(), OpStatus::Failed(_)));
    assert_eq!(c.status(ok).unwrap(), OpStatus::Complete);
    // A dependent op is refused, and the context refuses new work.
    assert!(matches!(
        c.queue_compute("after", &[bad], |_| Ok(())),
        Err(Error::ContextPoisoned { .. } | Error::DependencyFailed { .. })
    ));
    assert!(matches!(
        c.queue_compute("later", &[], |_| Ok(())),
        Err(Error::ContextPoisoned { .. })
    ));
    eprintln!("fault reported as: {err}");
    // Every handle on the context says why it is unusable, the one opened
    // before the fault and one opened after it.
    let illegal = |r: &str| r.to_lowercase().contains("illegal");
    match other.check_usable() {
        Err(Error::ContextPoisoned { reason }) => assert!(illegal(&reason), "{reason}"),
        r => panic!("the other handle: expected ContextPoisoned, got {r:?}"),
    }
    match prism_stream::Gpu::open(0) {
        Err(Error::ContextPoisoned { reason }) => assert!(illegal(&reason), "{reason}"),
        r => panic!("a new open: expected ContextPoisoned, got {r:?}"),
    }
    assert!(matches!(
        prism_stream::ManagedGpuContext::new(0, true),
        Err(Error::ContextPoisoned { .. })
    ));
}
