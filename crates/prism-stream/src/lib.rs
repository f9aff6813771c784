//! prism-stream
