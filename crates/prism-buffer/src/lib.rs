//! prism-buffer
