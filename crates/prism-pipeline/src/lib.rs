//! prism-pipeline
