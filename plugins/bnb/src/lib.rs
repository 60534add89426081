//! bitsandbytes-compatible quantization for kvant: NF4 and FP4 (4-bit blockwise, optionally with
//! double-quantized absmax) and LLM.int8(), producing the same bytes bitsandbytes 0.50 produces.

pub mod double_quant;
pub mod forward;
pub mod four_bit;
pub mod input;
pub mod int8;
pub mod quant_state;
