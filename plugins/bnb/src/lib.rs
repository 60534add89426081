//! bitsandbytes-compatible quantization for kvant: NF4 and FP4 (4-bit blockwise, optionally with
//! double-quantized absmax) and LLM.int8(), producing the same bytes bitsandbytes 0.50 produces.
//!
//! The algorithms live one format per module; [`plugin`] wraps them as the kvant methods
//! `bnb-nf4`, `bnb-fp4` and `bnb-int8`.

pub mod double_quant;
pub mod forward;
pub mod four_bit;
pub mod input;
pub mod int8;
pub mod plugin;
pub mod quant_state;

kvant_plugin_api::export_plugin!(plugin::Bnb4::nf4(), plugin::Bnb4::fp4(), plugin::BnbInt8);
