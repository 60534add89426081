//! kvant-gguf: reads the block types of llama.cpp's GGUF checkpoints.
//!
//! GGUF is a pre-quantized method, as in transformers (which dequantizes it on load): kvant reads
//! it and never writes it. The host parses the container (`kvant::gguf`) and hands this plugin one
//! tensor at a time: the raw block bytes as a U8 tensor named `weight`, with the module's
//! attributes `{"ggml_type": 3 or "Q4_1", "n_elements": N}` and optionally `"shape": [out, in]`.

pub mod blocks;

use kvant_plugin_api::{
    export_plugin, Config, DType, Error, Flags, MethodInfo, Module, ModulePlan, ModuleTensors,
    NoCalibration, QuantMethod, Quantized, Result,
};
use serde_json::{json, Value};

pub use blocks::{dequantize, dequantize_into, GgmlType};

/// The `gguf` method.
pub struct Gguf;

/// The ggml type named by the module's `ggml_type` attribute (its number or its name).
fn ggml_type(plan: &ModulePlan) -> Result<GgmlType> {
    let attr = &plan.attrs["ggml_type"];
    let ty = match attr {
        Value::Number(n) => n
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .and_then(GgmlType::from_id),
        Value::String(s) => GgmlType::parse(s),
        Value::Null => {
            return Err(Error::new(format!(
                "module `{}`: attribute `ggml_type` is missing",
                plan.name
            )));
        }
        _ => None,
    };
    ty.ok_or_else(|| {
        let known: Vec<&str> = GgmlType::ALL.iter().map(|t| t.name()).collect();
        Error::new(format!(
            "module `{}`: ggml type {attr} is not supported (supported: {})",
            plan.name,
            known.join(", ")
        ))
    })
}

/// Element count: the `n_elements` attribute, else the product of `plan.shape`.
fn n_elements(plan: &ModulePlan) -> Result<usize> {
    match &plan.attrs["n_elements"] {
        Value::Null => Ok(plan.shape.0 * plan.shape.1),
        v => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                Error::new(format!(
                    "module `{}`: attribute `n_elements` = {v} is not a count",
                    plan.name
                ))
            }),
    }
}

impl QuantMethod for Gguf {
    type Observer = NoCalibration;

    fn info(&self) -> MethodInfo {
        MethodInfo {
            name: "gguf".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description:
                "llama.cpp GGUF block types (F32/F16/BF16, Q4_0..Q8_0, Q2_K..Q6_K), read-only"
                    .into(),
            answers_to: vec![json!({"quant_method": "gguf"})
                .as_object()
                .expect("object")
                .clone()],
            flags: Flags {
                requires_calibration: false,
                requires_parameters_quantization: false,
                is_serializable: false,
                is_trainable: false,
            },
            required_packages: vec![],
            options: vec![],
            // Dequantization is exact; there is no quantize to measure against.
            tolerance: f32::EPSILON,
            forward_tolerance: kvant_plugin_api::DEFAULT_FORWARD_TOLERANCE,
            // Reads GGUF only: planning refuses, and `kvant plugin check` checks that refusal.
            read_only: true,
            config_files: Vec::new(),
        }
    }

    fn plan_linear(&self, module: &Module, _config: &Config) -> Result<Option<ModulePlan>> {
        Err(Error::new(format!(
            "module `{}`: gguf is read-only in kvant (pre-quantized checkpoints only); choose another method to quantize",
            module.name
        )))
    }

    fn quantize(
        &self,
        weights: &ModuleTensors<'_>,
        _: Option<&NoCalibration>,
        _: &Config,
    ) -> Result<Quantized> {
        Err(Error::new(format!(
            "module `{}`: gguf is read-only in kvant",
            weights.plan.name
        )))
    }

    fn linear_shape(&self, module: &ModuleTensors<'_>, _config: &Config) -> Result<(usize, usize)> {
        let plan = module.plan;
        let shape: Option<Vec<usize>> = plan.attrs["shape"].as_array().map(|s| {
            s.iter()
                .filter_map(|v| v.as_u64().map(|v| v as usize))
                .collect()
        });
        if let Some(&[out, inp]) = shape.as_deref() {
            return Ok((out, inp));
        }
        if plan.shape.0 * plan.shape.1 == n_elements(plan)? && plan.shape.0 > 0 {
            return Ok(plan.shape);
        }
        Err(Error::new(format!(
            "module `{}`: GGUF blocks do not record the matrix shape; pass attribute `shape` = [out, in]",
            plan.name
        )))
    }

    fn dequantize(&self, module: &ModuleTensors<'_>, _config: &Config) -> Result<Vec<f32>> {
        let plan = module.plan;
        let ty = ggml_type(plan)?;
        let n = n_elements(plan)?;
        let blocks = module.get("weight")?;
        if blocks.dtype != DType::U8 {
            return Err(Error::new(format!(
                "module `{}`: `weight` holds GGUF block bytes and must be U8, got {}",
                plan.name, blocks.dtype
            )));
        }
        dequantize(ty, blocks.data, n)
            .map_err(|e| Error::new(format!("module `{}`: {e}", plan.name)))
    }
}

export_plugin!(Gguf);

#[cfg(test)]
mod tests {
    use half::f16;
    use kvant_plugin_api::{Config, TensorView};

    use super::*;

    fn plan(attrs: Value) -> ModulePlan {
        ModulePlan {
            name: "blk.0.attn_q".into(),
            shape: (2, 32),
            tensors: vec![],
            attrs,
        }
    }

    #[test]
    fn dequantizes_through_the_trait() {
        // Two Q8_0 blocks: d = 0.5, codes 0..32 and -32..0.
        let mut bytes = Vec::new();
        for base in [0i8, -32] {
            bytes.extend(f16::from_f32(0.5).to_le_bytes());
            bytes.extend((0..32).map(|i| (base + i) as u8));
        }
        let shape = [bytes.len()];
        let tensors = [TensorView {
            name: "weight",
            dtype: DType::U8,
            shape: &shape,
            data: &bytes,
        }];
        let config = Config::validate(&Gguf.info().options, &Default::default()).unwrap();
        for attrs in [
            json!({"ggml_type": 8, "n_elements": 64}),
            json!({"ggml_type": "q8_0"}),
        ] {
            let p = plan(attrs);
            let m = ModuleTensors {
                plan: &p,
                tensors: &tensors,
            };
            let w = Gguf.dequantize(&m, &config).unwrap();
            assert_eq!((w[1], w[32], w[63]), (0.5, -16.0, -0.5));
            assert_eq!(Gguf.linear_shape(&m, &config).unwrap(), (2, 32));
        }
        let p = plan(json!({"ggml_type": 16, "n_elements": 64}));
        let e = Gguf
            .dequantize(
                &ModuleTensors {
                    plan: &p,
                    tensors: &tensors,
                },
                &config,
            )
            .unwrap_err();
        assert!(
            e.0.contains("blk.0.attn_q") && e.0.contains("not supported"),
            "{e}"
        );
    }
}
