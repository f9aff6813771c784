//! Misuses that no longer compile (issue #10): each file under
//! `tests/compile-fail/` is a program a user could write, and must be
//! rejected by the compiler with the error recorded next to it. Runs on the
//! CPU (CI included). Regenerate the expected output after a toolchain
//! change with `TRYBUILD=overwrite cargo test -p prism-stream --test compile_fail`.

#[test]
fn misuses_do_not_compile() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/compile-fail/*.rs");
}
