//! kvant host: plugin registry, checkpoint I/O, the quantization lifecycle, evaluation.
pub mod allocator;
pub mod checkpoint;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod arch;
pub mod lifecycle;
pub mod progress;
pub mod registry;
pub mod requirements;
pub mod resume;
pub mod watchdog;
pub mod model;
pub mod eval;
pub mod calibration;
pub mod import;
pub mod packed;
pub mod conformance;
