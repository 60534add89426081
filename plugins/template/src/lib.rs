//! Per-row absmax int8: a complete, minimal kvant method to copy when writing a new one.
//!
//! Each weight row `w` of a Linear is stored as int8 codes `q = round(w / s)` with one F32 scale
//! per row, `s = max|w| / 127` (`clip` below 1 shrinks `s` and saturates the largest values).
//! Stored per converted Linear `P` (quant_method `absmax-int8`):
//! - `P.qweight`: I8 `[out, in]`;
//! - `P.scales`: F32 `[out]`;
//! - `P.bias` unchanged.
//!
//! The hooks below are all a method must write; everything else has a default (see
//! `QuantMethod` in kvant-plugin-api). `kvant plugin check` runs the conformance suite on it.

use kvant_plugin_api::{
    export_plugin, Config, DType, Error, Flags, MethodInfo, Module, ModulePlan, ModuleTensors, NoCalibration,
    OptionSpec, QuantMethod, Quantized, Result, Tensor, TensorSpec,
};
use serde_json::json;

/// The method's name in `kvant list`, `--method` and the checkpoint's `quant_method`.
pub const NAME: &str = "absmax-int8";

/// The `absmax-int8` method.
pub struct AbsmaxInt8;

/// Codes and per-row scales of an `[out, in]` F32 matrix.
pub fn quantize_rows(w: &[f32], inp: usize, clip: f32) -> (Vec<i8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(w.len() / inp.max(1));
    for row in w.chunks(inp) {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs())) * clip;
        // An all-zero row still needs a usable scale.
        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
        codes.extend(row.iter().map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8));
        scales.push(scale);
    }
    (codes, scales)
}

/// The F32 matrix that codes and scales stand for.
pub fn dequantize_rows(codes: &[i8], scales: &[f32]) -> Vec<f32> {
    let inp = codes.len() / scales.len().max(1);
    codes.chunks(inp.max(1)).zip(scales).flat_map(|(row, s)| row.iter().map(move |&q| f32::from(q) * s)).collect()
}

impl QuantMethod for AbsmaxInt8 {
    /// No calibration: `quantize` sees the weights only.
    type Observer = NoCalibration;

    fn info(&self) -> MethodInfo {
        MethodInfo {
            name: NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Per-row absmax int8 (the method template)".into(),
            // Checkpoints whose quantization_config has these keys are read back with this method.
            answers_to: vec![json!({"quant_method": NAME}).as_object().cloned().expect("an object")],
            flags: Flags { requires_parameters_quantization: true, is_serializable: true, ..Flags::default() },
            required_packages: vec![],
            options: vec![OptionSpec::float("clip", 1.0, 0.5, 1.0, "fraction of each row's absmax mapped to 127")],
            // Int8 per row on Gaussian weights: about 0.01; the conformance suite checks it.
            tolerance: 0.02,
            // `forward` is dequantize + matrix product (the trait's default): only the sums' order differs.
            forward_tolerance: kvant_plugin_api::DEFAULT_FORWARD_TOLERANCE,
            read_only: false,
            config_files: Vec::new(),
        }
    }

    /// What `quantize` will return for one Linear: the host lays out the output from it.
    fn plan_linear(&self, module: &Module, _: &Config) -> Result<Option<ModulePlan>> {
        let (out, inp) = module.linear_shape().expect("the host passes Linear modules only");
        let mut tensors = vec![TensorSpec::new("qweight", DType::I8, [out, inp]), TensorSpec::new("scales", DType::F32, [out])];
        tensors.extend(module.tensors.iter().filter(|t| t.name == "bias").cloned());
        Ok(Some(ModulePlan { name: module.name.clone(), shape: (out, inp), tensors, attrs: json!(null) }))
    }

    fn quantize(&self, weights: &ModuleTensors<'_>, _: Option<&NoCalibration>, config: &Config) -> Result<Quantized> {
        let (out, inp) = weights.plan.shape;
        let (codes, scales) = quantize_rows(&weights.get("weight")?.as_f32(), inp, config.float("clip") as f32);
        let mut tensors =
            vec![Tensor::from_slice("qweight", DType::I8, [out, inp], &codes), Tensor::f32("scales", [out], &scales)];
        if let Some(b) = weights.find("bias") {
            tensors.push(Tensor { name: "bias".into(), dtype: b.dtype, shape: b.shape.to_vec(), data: b.data.to_vec() });
        }
        Ok(Quantized::tensors(tensors))
    }

    /// `[out, in]` of a stored module, for reading checkpoints back.
    fn linear_shape(&self, module: &ModuleTensors<'_>, _: &Config) -> Result<(usize, usize)> {
        match *module.get("qweight")?.shape {
            [out, inp] => Ok((out, inp)),
            ref other => Err(Error::new(format!("`{}`: qweight has shape {other:?}", module.plan.name))),
        }
    }

    fn dequantize(&self, module: &ModuleTensors<'_>, _: &Config) -> Result<Vec<f32>> {
        let codes = module.get("qweight")?;
        let codes: Vec<i8> = codes.data.iter().map(|&b| b as i8).collect();
        Ok(dequantize_rows(&codes, &module.get("scales")?.as_f32()))
    }
}

export_plugin!(AbsmaxInt8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_within_half_a_step() {
        let w: Vec<f32> = (0..64).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
        let (codes, scales) = quantize_rows(&w, 16, 1.0);
        assert_eq!(scales.len(), 4);
        let back = dequantize_rows(&codes, &scales);
        // Each row's largest magnitude maps to ±127 exactly.
        assert!(codes.chunks(16).all(|row| row.iter().any(|&q| q.abs() == 127)));
        for (row, (b, s)) in w.chunks(16).zip(back.chunks(16).zip(&scales)) {
            for (a, b) in row.iter().zip(b) {
                assert!((a - b).abs() <= s / 2.0 + 1e-6, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn zero_rows_stay_zero() {
        let (codes, scales) = quantize_rows(&[0.0; 8], 8, 1.0);
        assert_eq!(codes, [0; 8]);
        assert_eq!(dequantize_rows(&codes, &scales), [0.0; 8]);
    }

    #[test]
    fn clipping_saturates_the_largest_values() {
        let (codes, _) = quantize_rows(&[1.0, 0.5, -1.0, 0.1], 4, 0.5);
        assert_eq!(codes[0], 127);
        assert_eq!(codes[2], -127);
        assert_eq!(codes[1], 127);
    }
}
