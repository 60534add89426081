//! GPTQ (Frantar et al., 2022): integer weights whose rounding errors are compensated, column
//! by column, through the inverse Hessian of the layer's calibration inputs.
//!
//! Writes the GPTQ checkpoint layout that GPTQModel, AutoGPTQ, transformers and vLLM read, per
//! converted Linear `P` (`quant_method` `gptq`):
//! - `P.qweight` I32 `[in*bits/32, out]`, `P.qzeros` I32 `[groups, out*bits/32]` (see
//!   [`packing`] for the bit layout), `P.scales` F16 `[groups, out]`, `P.g_idx` I32 `[in]`,
//!   `P.bias` F16 when present;
//! - weight `(q - zero) * scale` with the group of input `i` being `g_idx[i]`; `checkpoint_format`
//!   `gptq` (v1) stores `zero - 1` in `qzeros`, `gptq_v2` stores `zero`.
//!
//! Linears whose input or output width is not a multiple of 32 stay dense: the layout cannot
//! hold them.

mod bf16;
pub mod hessian;
pub mod linalg;
pub use kvant_intpack as packing;
pub mod solve;

use std::borrow::Cow;

use kvant_plugin_api::{
    dense, export_plugin, Config, ConfigProblem, DType, Error, Flags, MethodInfo, Module, ModulePlan, ModuleTensors,
    OptionSpec, QuantMethod, Quantized, Result, Summary, Tensor, TensorSpec,
};
use rayon::prelude::*;
use serde_json::{json, Map, Value};

pub use hessian::HessianObserver;
pub use solve::{gptq, solve, Factored, GptqOutput, GptqParams};

/// The `gptq` method.
pub struct Gptq;

/// The settings of the solve, from validated options.
pub fn params(config: &Config) -> GptqParams {
    let sym = config.bool("sym");
    GptqParams {
        bits: config.int("bits") as u32,
        group_size: config.int("group_size"),
        sym,
        desc_act: config.bool("desc_act"),
        static_groups: config.bool("static_groups"),
        damp_percent: config.float("damp_percent"),
        damp_auto_increment: config.float("damp_auto_increment"),
        mse: config.float("mse"),
        zero_at_least_one: !sym && v1(config),
        refit_scales: config.bool("refit_scales"),
    }
}

fn v1(config: &Config) -> bool {
    config.str("checkpoint_format") == "gptq"
}

fn groups(inp: usize, group_size: i64) -> usize {
    if group_size <= 0 {
        1
    } else {
        inp.div_ceil(group_size as usize)
    }
}

/// The GPTQ tensors of an `out x inp` Linear.
fn tensor_specs(out: usize, inp: usize, config: &Config, bias: bool) -> Vec<TensorSpec> {
    let bits = config.int("bits") as usize;
    let g = groups(inp, config.int("group_size"));
    let mut specs = vec![
        TensorSpec::new("qweight", DType::I32, [inp * bits / 32, out]),
        TensorSpec::new("qzeros", DType::I32, [g, out * bits / 32]),
        TensorSpec::new("scales", DType::F16, [g, out]),
        TensorSpec::new("g_idx", DType::I32, [inp]),
    ];
    if bias {
        specs.push(TensorSpec::new("bias", DType::F16, [out]));
    }
    specs
}

/// The `quantization_config` for `config.json` as GPTQModel writes it; the same dictionary is
/// the content of `quantize_config.json`. Keys transformers' `GPTQConfig` knows stay at the
/// top level; the rest go under `meta`, as GPTQModel does, kvant's own options included, so
/// that [`QuantMethod::config_from_checkpoint`] restores every option.
pub fn quantization_config(config: &Config) -> Map<String, Value> {
    let v = |key: &str| config.values()[key].clone();
    let mut qc = Map::new();
    qc.insert("quant_method".into(), "gptq".into());
    for key in ["bits", "group_size", "desc_act", "sym", "damp_percent", "static_groups", "true_sequential"] {
        qc.insert(key.into(), v(key));
    }
    qc.insert("lm_head".into(), false.into());
    qc.insert("checkpoint_format".into(), v("checkpoint_format"));
    qc.insert("pack_dtype".into(), "int32".into());
    qc.insert(
        "meta".into(),
        json!({
            "quantizer": [format!("kvant-gptq:{}", env!("CARGO_PKG_VERSION"))],
            "damp_percent": v("damp_percent"),
            "damp_auto_increment": v("damp_auto_increment"),
            "static_groups": v("static_groups"),
            "true_sequential": v("true_sequential"),
            "mse": v("mse"),
            "refit_scales": v("refit_scales"),
            "hessian_dtype": v("hessian_dtype"),
        }),
    );
    qc
}

impl QuantMethod for Gptq {
    type Observer = HessianObserver;

    fn info(&self) -> MethodInfo {
        MethodInfo {
            name: "gptq".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "GPTQ: Hessian-compensated 2/3/4/8-bit weights in the GPTQModel/AutoGPTQ checkpoint format".into(),
            answers_to: vec![json!({"quant_method": "gptq"}).as_object().unwrap().clone()],
            flags: Flags {
                requires_calibration: true,
                requires_parameters_quantization: false,
                is_serializable: true,
                is_trainable: true,
            },
            required_packages: vec!["calibration".into()],
            options: vec![
                OptionSpec::int_choice("bits", 4, &[2, 3, 4, 8], "bits per weight"),
                OptionSpec::int("group_size", 128, -1, 1 << 20, "input columns per scale; -1: one group per output row"),
                OptionSpec::bool("sym", true, "symmetric levels (zero point fixed at 2^(bits-1))"),
                OptionSpec::bool("desc_act", false, "act-order: quantize columns by decreasing Hessian diagonal"),
                OptionSpec::bool("static_groups", false, "with groups: fix every group's scale from the original weights first"),
                OptionSpec::float("damp_percent", 0.05, 0.0, 1.0, "dampening added to the Hessian diagonal, fraction of its mean"),
                OptionSpec::float(
                    "damp_auto_increment",
                    0.01,
                    0.0,
                    1.0,
                    "added to damp_percent while the Hessian is not positive definite (0: fail instead)",
                ),
                OptionSpec::bool("true_sequential", true, "quantize q/k/v, o, gate/up, down in turn, each seeing quantized inputs"),
                // On by default (GPTQModel's default is 0): on SmolLM2 4-bit g128 it takes the
                // perplexity from 30.38 to 28.96 for a few seconds of search.
                OptionSpec::float(
                    "mse",
                    2.4,
                    0.0,
                    100.0,
                    "clipping-grid search for group scales: error norm exponent (GPTQModel's mse); 0 disables",
                ),
                OptionSpec::choice("checkpoint_format", "gptq", &["gptq", "gptq_v2"], "gptq (v1, stores zero-1) or gptq_v2"),
                // On by default: on SmolLM2 4-bit g128 it takes the perplexity from 28.96 to
                // 28.32 for a few seconds.
                OptionSpec::bool(
                    "refit_scales",
                    true,
                    "kvant: after the solve, refit each row's group scales (codes fixed) to its least output error",
                ),
                OptionSpec::choice(
                    "hessian_dtype",
                    "bf16",
                    &["bf16", "f32"],
                    "products of the Hessian accumulation: bf16 (AVX512-BF16, F32 sums; F32 where absent) or f32",
                ),
            ],
            tolerance: 0.25,
            forward_tolerance: kvant_plugin_api::DEFAULT_FORWARD_TOLERANCE,
            read_only: false,
            config_files: vec!["quantize_config.json".into()],
        }
    }

    fn check_config(&self, config: &Config) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        if config.int("group_size") == 0 {
            problems.push(ConfigProblem::new("group_size", "must be -1 (per row) or at least 1, got 0"));
        }
        let damp = config.float("damp_percent");
        if !(damp > 0.0 && damp < 1.0) {
            problems.push(ConfigProblem::new("damp_percent", format!("must be strictly between 0 and 1, got {damp}")));
        }
        problems
    }

    fn config_from_checkpoint(&self, qc: &Map<String, Value>) -> Result<Map<String, Value>> {
        let meta = qc.get("meta").and_then(Value::as_object);
        let mut options = Map::new();
        for spec in self.info().options {
            // GPTQModel keeps some keys under `meta` and spells the format `format` or `checkpoint_format`.
            let found = match spec.key.as_str() {
                "checkpoint_format" => qc.get("checkpoint_format").or_else(|| qc.get("format")),
                key => qc.get(key).filter(|v| !v.is_null()).or_else(|| meta.and_then(|m| m.get(key))),
            };
            if let Some(v) = found.filter(|v| !v.is_null()) {
                options.insert(spec.key.clone(), v.clone());
            }
        }
        if let Some(Value::String(f)) = options.get("checkpoint_format") {
            if f != "gptq" && f != "gptq_v2" {
                return Err(Error::new(format!("GPTQ checkpoint format `{f}` is not supported (gptq and gptq_v2 are)")));
            }
        }
        Ok(options)
    }

    fn plan_linear(&self, module: &Module, config: &Config) -> Result<Option<ModulePlan>> {
        let (out, inp) = module.linear_shape().expect("host passes Linear modules only");
        if inp % 32 != 0 || out % 32 != 0 {
            log::warn!("module `{}` ({out}x{inp}) stays dense: GPTQ packing needs widths that are multiples of 32", module.name);
            return Ok(None);
        }
        let tensors = tensor_specs(out, inp, config, module.has_bias());
        Ok(Some(ModulePlan { name: module.name.clone(), shape: (out, inp), tensors, attrs: Value::Null }))
    }

    fn new_observer(&self, module: &ModulePlan, config: &Config) -> Result<HessianObserver> {
        Ok(HessianObserver::new(module.name.clone(), module.shape.1).with_bf16(config.str("hessian_dtype") == "bf16"))
    }

    fn quantize(&self, weights: &ModuleTensors<'_>, observer: Option<&HessianObserver>, config: &Config) -> Result<Quantized> {
        let mut one = self.quantize_group(std::slice::from_ref(weights), &[observer], config)?;
        Ok(one.remove(0))
    }

    /// Members that share an observer (q/k/v, gate/up) share one factorization of its Hessian,
    /// and the members are solved side by side (each solve alone leaves cores idle).
    fn quantize_group(
        &self,
        members: &[ModuleTensors<'_>],
        observers: &[Option<&HessianObserver>],
        config: &Config,
    ) -> Result<Vec<Quantized>> {
        if members.len() != observers.len() {
            return Err(Error::new(format!("{} group members but {} observers", members.len(), observers.len())));
        }
        let p = params(config);
        let mut factored: Vec<(&HessianObserver, Factored)> = Vec::new();
        for (m, observer) in members.iter().zip(observers) {
            let name = &m.plan.name;
            let observer = observer
                .ok_or_else(|| Error::new(format!("module `{name}`: GPTQ needs calibration data, and none was observed")))?;
            if factored.iter().any(|(o, _)| std::ptr::eq(*o, observer)) {
                continue;
            }
            let inp = m.plan.shape.1;
            let h = if observer.rows() == 0 {
                // Never reached by the calibration data (an unused expert): plain rounding is
                // all that can be done, which GPTQ with an identity Hessian is.
                log::warn!("module `{name}` saw no calibration rows; quantizing it without error compensation");
                (0..inp * inp).map(|k| if k % (inp + 1) == 0 { 1.0 } else { 0.0 }).collect()
            } else {
                observer.hessian()
            };
            factored.push((observer, Factored::new(name, h, inp, &p)?));
        }
        members
            .par_iter()
            .zip(observers)
            .map(|(m, observer)| {
                let (name, (out, inp)) = (&m.plan.name, m.plan.shape);
                let observer = observer.expect("checked above");
                let (_, f) = factored.iter().find(|(o, _)| std::ptr::eq(*o, observer)).expect("factored above");
                if f.inputs() != inp {
                    return Err(Error::new(format!("module `{name}` has {inp} inputs, its observer saw {}", f.inputs())));
                }
                let w = m.get("weight")?.as_f32();
                let solved = solve(name, &w, (out, inp), f, observer.rows(), &p);
                let mut tensors = pack(&solved, out, inp, p.bits, v1(config));
                if let Some(b) = m.find("bias") {
                    tensors.push(Tensor::from_f32_as("bias", DType::F16, [out], &b.to_f32()));
                }
                Ok(Quantized { tensors, loss: Some(solved.loss), input_scale: None })
            })
            .collect()
    }

    fn process_model_after_weight_loading(&self, _summary: &Summary, config: &Config) -> Result<Map<String, Value>> {
        Ok(quantization_config(config))
    }

    fn linear_shape(&self, module: &ModuleTensors<'_>, config: &Config) -> Result<(usize, usize)> {
        let bits = config.int("bits") as usize;
        let q = module.get("qweight")?;
        match q.shape {
            [words, out] => Ok((*out, words * 32 / bits)),
            _ => Err(Error::new(format!("`{}.qweight` has shape {:?}, expected 2 dimensions", module.plan.name, q.shape))),
        }
    }

    fn dequantize(&self, module: &ModuleTensors<'_>, config: &Config) -> Result<Vec<f32>> {
        let packed = Packed::read(module, config)?;
        let mut w = vec![0f32; packed.out * packed.inp];
        w.par_chunks_mut(packed.inp).enumerate().for_each(|(o, row)| packed.decode_row(o, row));
        Ok(w)
    }

    fn forward(&self, module: &ModuleTensors<'_>, x: &[f32], rows: usize, config: &Config) -> Result<Vec<f32>> {
        let packed = Packed::read(module, config)?;
        let (out, inp) = (packed.out, packed.inp);
        if x.len() != rows * inp {
            return Err(Error::new(format!("`{}`: input has {} values, expected {rows} rows of {inp}", module.plan.name, x.len())));
        }
        let bias = module.find("bias").map(|b| b.to_f32());
        if rows > SMALL_BATCH {
            // Many rows amortise one dequantization; a matrix product then beats decoding per row.
            let mut w = vec![0f32; out * inp];
            w.par_chunks_mut(inp).enumerate().for_each(|(o, row)| packed.decode_row(o, row));
            return Ok(dense::linear_forward(x, rows, &w, (out, inp), bias.as_deref()));
        }
        // Few rows (token-by-token decoding): decode one output column at a time from the packed
        // words and never hold the dense matrix.
        let per_column: Vec<f32> = (0..out)
            .into_par_iter()
            .map_init(
                || vec![0f32; inp],
                |w, o| {
                    packed.decode_row(o, w);
                    let b = bias.as_ref().map_or(0.0, |b| b[o]);
                    x.chunks(inp).map(|xr| w.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>() + b).collect::<Vec<_>>()
                },
            )
            .flatten_iter()
            .collect();
        // per_column is [out, rows]; y is [rows, out].
        Ok((0..rows * out).map(|k| per_column[(k % out) * rows + k / out]).collect())
    }
}

/// Up to this many rows, `forward` decodes per output column instead of dequantizing whole.
const SMALL_BATCH: usize = 8;

/// The GPTQ tensors of a solved module (bias excluded).
pub fn pack(solved: &GptqOutput, out: usize, inp: usize, bits: u32, v1: bool) -> Vec<Tensor> {
    let groups = solved.scales.len() / out;
    let qweight = packing::pack_qweight(&solved.codes, inp, out, bits);
    let qzeros = packing::pack_qzeros(&solved.zeros, groups, out, bits, v1 as u32);
    let as_i32 = |w: Vec<u32>| w.into_iter().map(|v| v as i32).collect::<Vec<i32>>();
    vec![
        Tensor::from_slice("qweight", DType::I32, [inp * bits as usize / 32, out], &as_i32(qweight)),
        Tensor::from_slice("qzeros", DType::I32, [groups, out * bits as usize / 32], &as_i32(qzeros)),
        Tensor::from_f32_as("scales", DType::F16, [groups, out], &solved.scales),
        Tensor::from_slice("g_idx", DType::I32, [inp], &solved.g_idx),
    ]
}

/// A GPTQ module's packed tensors, checked against each other.
struct Packed<'a> {
    out: usize,
    inp: usize,
    bits: u32,
    qweight: Cow<'a, [u32]>,
    /// `[groups, out]`, the true zero points (v1's stored `zero - 1` already corrected).
    zeros: Vec<f32>,
    scales: Vec<f32>,
    g_idx: Vec<usize>,
}

impl<'a> Packed<'a> {
    fn read(module: &ModuleTensors<'a>, config: &Config) -> Result<Self> {
        let name = &module.plan.name;
        let bits = config.int("bits") as u32;
        let (qw, qz, sc) = (module.get("qweight")?, module.get("qzeros")?, module.get("scales")?);
        let bad = |what: String| Error::new(format!("GPTQ module `{name}`: {what}"));
        let (words, out) = match qw.shape {
            [w, o] if qw.dtype == DType::I32 || qw.dtype == DType::U32 => (*w, *o),
            _ => return Err(bad(format!("qweight is {} {:?}, expected int32 [in*bits/32, out]", qw.dtype, qw.shape))),
        };
        let inp = words * 32 / bits as usize;
        if words * 32 % bits as usize != 0 || out * bits as usize % 32 != 0 {
            return Err(bad(format!("qweight {:?} does not fit {bits}-bit packing", qw.shape)));
        }
        let groups = match sc.shape {
            [g, o] if *o == out && *g > 0 => *g,
            _ => return Err(bad(format!("scales {:?} do not match {out} outputs", sc.shape))),
        };
        if qz.shape != [groups, out * bits as usize / 32] || !(qz.dtype == DType::I32 || qz.dtype == DType::U32) {
            return Err(bad(format!("qzeros is {} {:?}, expected int32 [{groups}, {}]", qz.dtype, qz.shape, out * bits as usize / 32)));
        }
        let g_idx: Vec<usize> = match module.find("g_idx") {
            Some(g) => {
                let v = g.to_f32();
                if v.len() != inp {
                    return Err(bad(format!("g_idx has {} entries for {inp} inputs", v.len())));
                }
                v.into_iter().map(|x| x as usize).collect()
            }
            // Old checkpoints without g_idx: consecutive groups.
            None => (0..inp).map(|i| i * groups / inp).collect(),
        };
        if let Some(&g) = g_idx.iter().find(|&&g| g >= groups) {
            return Err(bad(format!("g_idx names group {g}, but there are {groups}")));
        }
        let qz_words = qz.cast::<u32>()?;
        let offset = if config.str("checkpoint_format") == "gptq" { 1 } else { 0 };
        let row = out * bits as usize / 32;
        let zeros = (0..groups * out)
            .map(|k| (packing::get(&qz_words, k / out * row, 1, k % out, bits) + offset) as f32)
            .collect();
        Ok(Packed { out, inp, bits, qweight: qw.cast::<u32>()?, zeros, scales: sc.to_f32(), g_idx })
    }

    /// Dense row `o` of the weight (`inp` values) into `row`.
    fn decode_row(&self, o: usize, row: &mut [f32]) {
        let mut codes = [0u8; 32];
        for (p, dst) in row.chunks_mut(32).enumerate() {
            packing::unpack_block(&self.qweight, self.out, o, p, self.bits, &mut codes);
            for (k, v) in dst.iter_mut().enumerate() {
                let g = self.g_idx[p * 32 + k] * self.out + o;
                *v = (codes[k] as f32 - self.zeros[g]) * self.scales[g];
            }
        }
    }
}

export_plugin!(Gptq);
