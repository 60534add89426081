//! kvant host: plugin registry, checkpoint I/O, the quantization lifecycle, evaluation.
pub mod checkpoint;
