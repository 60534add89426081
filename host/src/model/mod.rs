//! The Llama-family forward pass (llama, mistral, qwen2; SmolLM is a llama) in F32, batched over
//! windows, with every Linear behind [`LinearOp`] so quantized layers can replace dense ones.

pub mod bf16;
mod config;
mod linear;
mod llama;
mod ops;

use anyhow::{ensure, Result};

use crate::checkpoint::Checkpoint;

pub use config::{LlamaConfig, RopeScaling};
pub use linear::{matmul_transb, DeferredLinear, DenseLinear, LinearOp};
pub use llama::{GroupEvent, GroupHook, LinearFactory, LlamaModel, BLOCK_LINEARS, INPUT_GROUPS};
pub(crate) use ops::{max, sum_exp, sum_exp_times_diff};

/// Where a model's weights come from, by full Hugging Face tensor name.
pub trait TensorSource {
    /// The shape of a tensor, outermost first; `None` if there is no such tensor.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// A floating-point tensor's values converted to F32, row-major.
    fn tensor_f32(&self, name: &str) -> Result<Vec<f32>>;
}

impl TensorSource for Checkpoint {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.spec(name).map(|s| s.shape.clone())
    }

    fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let view = self.view(name)?;
        ensure!(
            view.dtype.is_float(),
            "tensor `{name}` is {:?}, not a floating-point type: a quantized layer needs a LinearOp from its method",
            view.dtype
        );
        // F32 data is copied as is; other float types are converted.
        Ok(view.as_f32().into_owned())
    }
}

#[cfg(test)]
mod tests;
