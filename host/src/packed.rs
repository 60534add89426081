//! Quantized layers inside the model: a [`LinearOp`] that runs a plugin's `forward` on the
//! packed tensors, and loading any checkpoint a plugin reads as a runnable model.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use kvant_plugin_api::ffi::MethodClient;
use kvant_plugin_api::{Config, ModulePlan, Tensor, TensorView};

use crate::checkpoint::Checkpoint;
use crate::lifecycle::{checkpoint_method, packed_modules};
use crate::model::{LinearOp, LlamaConfig, LlamaModel};
use crate::registry::Registry;

/// A Linear whose weights stay packed; every call goes through the method's `forward`.
pub struct PackedLinear {
    method: Arc<MethodClient>,
    plan: ModulePlan,
    tensors: Vec<Tensor>,
    config: Config,
}

impl PackedLinear {
    /// Wraps a module's packed tensors (names relative to the module).
    pub fn new(method: Arc<MethodClient>, plan: ModulePlan, tensors: Vec<Tensor>, config: Config) -> Self {
        PackedLinear { method, plan, tensors, config }
    }
}

impl LinearOp for PackedLinear {
    fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let views: Vec<TensorView<'_>> = self.tensors.iter().map(Tensor::view).collect();
        self.method
            .forward(&self.plan, &views, x, rows, &self.config)
            .map_err(|e| anyhow!("method `{}` forward of `{}`: {e}", self.method.info().name, self.plan.name))
    }

    fn in_features(&self) -> usize {
        self.plan.shape.1
    }

    fn out_features(&self) -> usize {
        self.plan.shape.0
    }
}

/// What a loaded model runs on.
pub struct LoadedModel {
    /// The model.
    pub model: LlamaModel,
    /// The method of a quantized checkpoint, if it is one.
    pub method: Option<String>,
    /// How many Linears run packed.
    pub packed_layers: usize,
}

/// Loads a Llama-family checkpoint, dense or quantized by any method the registry knows; packed
/// layers stay packed and run through their plugin.
pub fn load_model(registry: &Registry, dir: &Path) -> Result<LoadedModel> {
    let checkpoint = Checkpoint::open(dir)?;
    let config = LlamaConfig::from_json(checkpoint.config())
        .with_context(|| format!("{}: cannot run the model its config.json describes", dir.display()))?;
    let weights_context = || format!("{}: cannot load the model's weights", dir.display());
    let Some((method, method_config)) = checkpoint_method(registry, &checkpoint)? else {
        let model = LlamaModel::load(config, &checkpoint, &mut |_| Ok(None)).with_context(weights_context)?;
        return Ok(LoadedModel { model, method: None, packed_layers: 0 });
    };
    let client = method.client.clone();
    let mut packed: HashMap<String, (ModulePlan, Vec<Tensor>)> = packed_modules(&checkpoint, &client, &method_config)?
        .into_iter()
        .map(|p| {
            let tensors = p
                .tensors
                .iter()
                .map(|v| Tensor { name: v.name.to_string(), dtype: v.dtype, shape: v.shape.to_vec(), data: v.data.to_vec() })
                .collect();
            (p.plan.name.clone(), (p.plan, tensors))
        })
        .collect();
    let packed_layers = packed.len();
    let model = LlamaModel::load(config, &checkpoint, &mut |name| {
        Ok(packed.remove(name).map(|(plan, tensors)| {
            Box::new(PackedLinear::new(client.clone(), plan, tensors, method_config.clone())) as Box<dyn LinearOp>
        }))
    })
    .with_context(weights_context)?;
    Ok(LoadedModel { model, method: Some(client.info().name.clone()), packed_layers })
}
