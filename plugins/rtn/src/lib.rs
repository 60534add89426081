//! Round-to-nearest quantization.
