//! kvant-gguf: dequantizes the block types of llama.cpp's GGUF checkpoints.

pub mod blocks;

pub use blocks::{dequantize, dequantize_into, GgmlType};
