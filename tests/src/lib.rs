//! Cross-crate integration tests: none yet. Each crate's own tests live in
//! its `tests/` folder; tests that span crates (e.g. the pipeline over the
//! triple buffer) will go in this package's `tests/` folder.
