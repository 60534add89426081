//! Round-to-nearest (RTN) integer quantization: the reference kvant plugin.
//!
//! Every weight row is cut into groups of `group_size` input values (`-1`: the whole row is one
//! group, i.e. per output channel; the last group of a row may be shorter). Each group gets a
//! scale, and in asymmetric mode a zero point, from its min and max; weights round to the
//! nearest of `2^bits` levels.
//!
//! Stored per converted Linear `P` (quant_method `rtn`, a kvant format):
//! - `P.qweight`: U8 `[out, ceil(in * bits / 8)]`, each row's codes as a bit stream, code `i`
//!   at bits `i*bits ..` counted from the least significant bit of byte 0;
//! - `P.scales`: F16 `[out, groups]`; `P.zeros`: U8 `[out, groups]` (asymmetric only);
//! - `P.bias` unchanged.
//!
//! Dequantized weight: `(code - zero) * scale`, with `zero = 2^(bits-1)` when symmetric.
//! Copy this crate to start a new method: `packing.rs` holds the format, this file the contract.

mod packing;

use kvant_plugin_api::{
    dense, export_plugin, Config, ConfigProblem, DType, Error, Flags, MethodInfo, Module, ModulePlan, ModuleTensors,
    NoCalibration, OptionSpec, QuantMethod, Quantized, Result, Tensor, TensorSpec, DEFAULT_FORWARD_TOLERANCE,
};
use rayon::prelude::*;
use serde_json::json;

pub use packing::{Layout, RtnParams};

/// The `rtn` method.
pub struct Rtn;

fn params(config: &Config) -> RtnParams {
    RtnParams { bits: config.int("bits") as u32, group_size: config.int("group_size"), sym: config.bool("sym") }
}

impl QuantMethod for Rtn {
    type Observer = NoCalibration;

    fn info(&self) -> MethodInfo {
        MethodInfo {
            name: "rtn".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Round-to-nearest integer weights, 2-8 bits, per channel or per group".into(),
            answers_to: vec![json!({"quant_method": "rtn"}).as_object().unwrap().clone()],
            flags: Flags {
                requires_calibration: false,
                requires_parameters_quantization: true,
                is_serializable: true,
                is_trainable: false,
            },
            required_packages: vec![],
            options: vec![
                OptionSpec::int("bits", 4, 2, 8, "bits per weight"),
                OptionSpec::int("group_size", 128, -1, 1 << 20, "input values per scale; -1: one group per row"),
                OptionSpec::bool("sym", false, "symmetric levels around zero (no stored zero point)"),
            ],
            tolerance: 0.15,
            // `forward` decodes the same weights and only sums in another order.
            forward_tolerance: DEFAULT_FORWARD_TOLERANCE,
            read_only: false,
            config_files: Vec::new(),
        }
    }

    fn check_config(&self, config: &Config) -> Vec<ConfigProblem> {
        match config.int("group_size") {
            0 => vec![ConfigProblem::new("group_size", "must be -1 (per row) or at least 1, got 0")],
            _ => vec![],
        }
    }

    fn plan_linear(&self, module: &Module, config: &Config) -> Result<Option<ModulePlan>> {
        let (out, inp) = module.linear_shape().expect("host passes Linear modules only");
        let layout = Layout::new(out, inp, params(config));
        let mut tensors = vec![
            TensorSpec::new("qweight", DType::U8, [out, layout.row_bytes]),
            TensorSpec::new("scales", DType::F16, [out, layout.groups]),
        ];
        if !layout.params.sym {
            tensors.push(TensorSpec::new("zeros", DType::U8, [out, layout.groups]));
        }
        tensors.extend(module.tensors.iter().filter(|t| t.name == "bias").cloned());
        Ok(Some(ModulePlan { name: module.name.clone(), shape: (out, inp), tensors, attrs: json!(null) }))
    }

    fn quantize(&self, weights: &ModuleTensors<'_>, _: Option<&NoCalibration>, config: &Config) -> Result<Quantized> {
        let (out, inp) = weights.plan.shape;
        let layout = Layout::new(out, inp, params(config));
        let w = weights.get("weight")?.as_f32();
        let packed = layout.quantize(&w);
        // The byte buffers become the tensors as they are (no copy).
        let mut tensors = vec![
            Tensor { name: "qweight".into(), dtype: DType::U8, shape: vec![out, layout.row_bytes], data: packed.qweight },
            Tensor::from_f32_as("scales", DType::F16, [out, layout.groups], &packed.scales),
        ];
        if !layout.params.sym {
            tensors.push(Tensor { name: "zeros".into(), dtype: DType::U8, shape: vec![out, layout.groups], data: packed.zeros });
        }
        if let Some(b) = weights.find("bias") {
            tensors.push(Tensor { name: "bias".into(), dtype: b.dtype, shape: b.shape.to_vec(), data: b.data.to_vec() });
        }
        Ok(Quantized::tensors(tensors))
    }

    fn linear_shape(&self, module: &ModuleTensors<'_>, config: &Config) -> Result<(usize, usize)> {
        let q = module.get("qweight")?;
        let s = module.get("scales")?;
        let (out, row_bytes, groups) = match (q.shape, s.shape) {
            ([o, rb], [o2, g]) if o == o2 => (*o, *rb, *g),
            _ => return Err(Error::new(format!("`{}`: qweight {:?} and scales {:?} do not agree", module.plan.name, q.shape, s.shape))),
        };
        let p = params(config);
        // Several input widths pack into the same row bytes; the group count picks the one.
        (1..=row_bytes * 8 / p.bits as usize)
            .rev()
            .find(|&inp| Layout::new(out, inp, p).row_bytes == row_bytes && Layout::new(out, inp, p).groups == groups)
            .map(|inp| (out, inp))
            .ok_or_else(|| Error::new(format!("`{}`: qweight {:?} does not fit {} bits", module.plan.name, q.shape, p.bits)))
    }

    fn dequantize(&self, module: &ModuleTensors<'_>, config: &Config) -> Result<Vec<f32>> {
        let (layout, packed) = read_packed(module, config)?;
        Ok(layout.dequantize(&packed))
    }

    fn forward(&self, module: &ModuleTensors<'_>, x: &[f32], rows: usize, config: &Config) -> Result<Vec<f32>> {
        let (layout, packed) = read_packed(module, config)?;
        let bias = module.find("bias").map(|b| b.to_f32());
        if rows > SMALL_BATCH {
            // Many rows amortise one dequantization; a matrix product then beats decoding per row.
            let w = layout.dequantize(&packed);
            return Ok(dense::linear_forward(x, rows, &w, (layout.out, layout.inp), bias.as_deref()));
        }
        // Few rows (token-by-token decoding): decode each output channel once, straight from the
        // packed codes, and never hold the dense matrix.
        let inp = layout.inp;
        let per_channel: Vec<f32> = (0..layout.out)
            .into_par_iter()
            .flat_map_iter(|o| {
                let w = layout.dequantize_row(&packed, o);
                let b = bias.as_ref().map_or(0.0, |b| b[o]);
                x.chunks(inp).map(move |xr| w.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>() + b).collect::<Vec<_>>()
            })
            .collect();
        // per_channel is [out, rows]; y is [rows, out].
        Ok((0..rows * layout.out).map(|i| per_channel[(i % layout.out) * rows + i / layout.out]).collect())
    }
}

/// Up to this many rows, `forward` decodes per output channel instead of dequantizing whole.
const SMALL_BATCH: usize = 8;

fn read_packed(module: &ModuleTensors<'_>, config: &Config) -> Result<(Layout, packing::Packed)> {
    let (out, inp) = module.plan.shape;
    let layout = Layout::new(out, inp, params(config));
    let expect = |name: &str, dtype: DType, shape: [usize; 2]| -> Result<()> {
        let t = module.get(name)?;
        if t.dtype != dtype || t.shape != shape {
            return Err(Error::new(format!(
                "`{}.{name}` is {} {:?}, expected {dtype} {shape:?} for {out}x{inp} at {} bits, group {}",
                module.plan.name, t.dtype, t.shape, layout.params.bits, layout.params.group_size
            )));
        }
        Ok(())
    };
    expect("qweight", DType::U8, [out, layout.row_bytes])?;
    expect("scales", DType::F16, [out, layout.groups])?;
    let zeros = if layout.params.sym {
        vec![]
    } else {
        expect("zeros", DType::U8, [out, layout.groups])?;
        module.get("zeros")?.data.to_vec()
    };
    let packed = packing::Packed {
        qweight: module.get("qweight")?.data.to_vec(),
        scales: module.get("scales")?.to_f32(),
        zeros,
    };
    Ok((layout, packed))
}

export_plugin!(Rtn);
