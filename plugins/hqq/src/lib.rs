//! HQQ (Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine Learning Models"):
//! calibration-free quantization whose zero points are fitted by a half-quadratic solver under
//! an lp norm (p < 1), written in the hqq library's own safetensors layout so that hqq's
//! `HQQLinear` and transformers' `HqqConfig` loading read kvant's output.
//!
//! - [`solver`]: the per-group solver, its defaults and where kvant departs from hqq 0.2.8;
//! - [`bitpack`]: hqq's bit packing for 1, 2, 3, 4 and 8 bits;
//! - [`format`]: the per-module tensors, quantization of a whole weight, dequantization;
//! - [`gptq`]: the opt-in GPTQ export (`export_format = "gptq"`).
//!
//! `scripts/check-hqq-load.py` loads every Linear of a kvant output into hqq's own `HQQLinear`
//! (all 210 of SmolLM2 at 4 and 3 bits load, worst weight error 0.088 and 0.232).
//!
//! Options keep `HqqConfig`'s and hqq's key names (`nbits`, `group_size`, `axis`, `round_zero`,
//! `optimize`, and the solver's `lp_norm`, `beta`, `kappa`, `iters`, `early_stop`). kvant adds
//! `compute_dtype` (hqq's `HQQLinear` argument of that name: the dtype of `scale`, `zero` and
//! `bias`, by default the weight's own) and `integer_zero` (below).
//!
//! # Why hqq degrades at 3 bits, and `integer_zero`
//!
//! On SmolLM2-135M, hqq 0.2.8 at 3-bit g64 gives perplexity 169 where round-to-nearest gives 64,
//! although hqq's *weight* error is lower than RTN's on every one of the 210 layers (relative
//! Frobenius 0.190 against 0.195 overall). What differs is the zero point: hqq's is a float
//! (`round_zero` is only on at 4 bits, and the solver moves it off the integers anyway), so no
//! code dequantizes to exactly 0 and weights near 0 land on a level up to half a step away. At
//! 3 bits a step is a seventh of the group's range, so near-zero weights get an error of about
//! twice their own size (mean 0.030 for |w| < 0.02, against 0.010 with an integer zero). That
//! would be harmless if the inputs were evenly spread, but LLMs have a few input channels with
//! huge activations, and the model keeps the weights that read them small: `v_proj`'s channel 247
//! (|x| up to 12 against a median of 0.4; median |w| 0.014 in that column) and `down_proj`'s
//! channel 1229 in layer 11 (|x| up to 3044). Their errors are multiplied by those activations:
//! in layer 12's `v_proj` that one column alone makes a relative output error of 0.47 with a
//! float zero and 0.25 with an integer one. Measured in Python with hqq 0.2.8 on the same split:
//! plain min-max with a float zero 176.9, hqq 169.4, min-max with the zero rounded (hqq's
//! `optimize=False, round_zero=True`) 63.77, the same as RTN. At 4 bits the step is half as
//! large and the effect small (hqq 26.18 against RTN 27.91).
//!
//! So kvant's `integer_zero` keeps zero points integers through the solver (0 stays exact; the
//! min-max start then also widens the range to include 0, as RTN does); it is on by default
//! below 4 bits. hqq's weight-error measure cannot see the effect, which is why the per-group
//! safeguard (keep min-max when it has the lower error) alone does not fix it. The format is
//! unchanged: integer zeros are stored as floats, as hqq's are. kvant's own figures on the same
//! split (`kvant eval`, 8 x 512 tokens): 4-bit g64 26.17 (hqq 26.18, kvant RTN 27.96); 3-bit
//! g64 63.78 (kvant RTN 63.49, within the standard error of 2.7: from RTN's start the
//! integer-zero iteration seldom finds a better zero); with `integer_zero=false` 167.7.
//! Per layer, the weight error is never above RTN's (tests/reference.rs).
//!
//! # The GPTQ export, and what it keeps of HQQ
//!
//! hqq's layout loads in transformers (through hqq) and, at 4-bit group 64, in vLLM (its `hqq`
//! method runs Marlin with float zeros; read from vLLM's source, not run here: it needs a GPU).
//! `export_format = "gptq"` writes the GPTQ layout instead, which GPTQModel's kernels (CPU and
//! GPU), transformers and vLLM's GPTQ kernels run at 2, 3, 4 and 8 bits ([`gptq`];
//! `plugins/gptq/scripts/check-gptqmodel.py` loads it with GPTQModel). GPTQ's zero points are integers, and
//! with an integer zero HQQ has nothing left to fit: its update `round(mean(q - w s))` from
//! round-to-nearest's start lands on that same zero (the rounding residuals average to about 0),
//! so the export holds RTN's parameters in nearly every group. SmolLM2-135M, 4-bit g64, same
//! split: export 27.95, kvant RTN 27.96, hqq's own layout 26.17 (its float zeros are where the 4-bit
//! gain is). Refitting the scale by least squares after the zero lowered the weight error (mean
//! relative 0.0885 against 0.0943) but raised the perplexity to 28.71, by shrinking ranges and
//! clipping the largest weights, so the export does not do it.

pub mod bitpack;
pub mod format;
pub mod gptq;
pub mod solver;

use kvant_plugin_api::{
    dense, export_plugin, Config, ConfigProblem, DType, Error, Flags, MethodInfo, Module, ModulePlan, ModuleTensors,
    NoCalibration, OptionSpec, QuantMethod, Quantized, Result, Summary, Tensor, TensorSpec,
};
use rayon::prelude::*;
use serde_json::{json, Map, Value};

use format::{flag_tensor, i32_tensor, string_tensor, Layout, Packed};
use gptq::{GptqLayout, GptqPacked};
use solver::SolverParams;

/// The `hqq` method.
pub struct Hqq;

/// hqq's rule when `round_zero` is not given: round the initial zero at 4 bits only.
fn round_zero(config: &Config) -> bool {
    config.get("round_zero").and_then(Value::as_bool).unwrap_or(config.int("nbits") == 4)
}

/// kvant's rule when `integer_zero` is not given: integer zero points below 4 bits.
fn integer_zero(config: &Config) -> bool {
    config.get("integer_zero").and_then(Value::as_bool).unwrap_or(config.int("nbits") < 4)
}

/// The solver settings a configuration asks for.
pub fn solver_params(config: &Config) -> SolverParams {
    SolverParams {
        nbits: config.int("nbits") as u32,
        round_zero: round_zero(config),
        optimize: config.bool("optimize"),
        lp_norm: config.float("lp_norm") as f32,
        beta: config.float("beta") as f32,
        kappa: config.float("kappa") as f32,
        iters: config.int("iters") as u32,
        early_stop: config.bool("early_stop"),
        integer_zero: integer_zero(config),
        stored: gptq_export(config).then(|| gptq::stored(gptq_v1(config))),
    }
}

/// The opt-in GPTQ export (see [`gptq`]) instead of hqq's own layout.
fn gptq_export(config: &Config) -> bool {
    config.str("export_format") == "gptq"
}

/// The export's GPTQ checkpoint format is v1 (`gptq`) rather than the default `gptq_v2`.
fn gptq_v1(config: &Config) -> bool {
    config.opt_str("checkpoint_format") == Some("gptq")
}

fn gptq_layout(out: usize, inp: usize, config: &Config) -> Result<GptqLayout> {
    GptqLayout::new(out, inp, config.int("nbits") as u32, config.int("group_size") as usize, gptq_v1(config))
}

fn gptq_read(module: &ModuleTensors<'_>, config: &Config) -> Result<GptqPacked> {
    GptqPacked::read(module, config.int("nbits") as u32, gptq_v1(config))
}

/// The `quantization_config` of the GPTQ export: GPTQModel's keys for an asymmetric v1
/// checkpoint without act-order, and under `meta` who made it and with which HQQ settings.
fn gptq_quantization_config(config: &Config) -> Map<String, Value> {
    let qc = json!({
        "quant_method": "gptq",
        "bits": config.int("nbits"),
        "group_size": config.int("group_size"),
        "desc_act": false,
        "sym": false,
        "lm_head": false,
        "checkpoint_format": if gptq_v1(config) { "gptq" } else { "gptq_v2" },
        "pack_dtype": "int32",
        "meta": {
            "quantizer": [format!("kvant-hqq:{}", env!("CARGO_PKG_VERSION"))],
            "hqq": {
                "optimize": config.bool("optimize"),
                "lp_norm": config.float("lp_norm"),
                "beta": config.float("beta"),
                "kappa": config.float("kappa"),
                "iters": config.int("iters"),
                "early_stop": config.bool("early_stop"),
                "integer_zero": true,
            },
        },
    });
    qc.as_object().unwrap().clone()
}

fn layout(out: usize, inp: usize, config: &Config) -> Result<Layout> {
    Layout::new(out, inp, config.int("nbits") as u32, config.int("group_size") as usize, config.int("axis") as u32)
}

/// The dtype of `scale`, `zero` and `bias`: the option, else the weight's float dtype.
fn compute_dtype(weight: Option<DType>, config: &Config) -> DType {
    match config.opt_str("compute_dtype").and_then(DType::parse) {
        Some(d) => d,
        None => weight.filter(|d| matches!(d, DType::F32 | DType::F16 | DType::BF16)).unwrap_or(DType::F16),
    }
}

/// The scalar and string tensors hqq stores beside `W_q`, `scale` and `zero`.
fn meta_tensors(l: &Layout, dtype: DType, config: &Config) -> Vec<Tensor> {
    vec![
        i32_tensor("nbits", l.packing.nbits as i32),
        i32_tensor("group_size", l.group_size as i32),
        Tensor::from_slice("shape", DType::I64, [2], &[l.out as i64, l.inp as i64]),
        i32_tensor("axis", l.axis as i32),
        string_tensor("packing", l.packing.name()),
        string_tensor("unpack_view_dtype", l.packing.torch_view_dtype()),
        flag_tensor("view_as_float", false),
        flag_tensor("quant_scale", false),
        flag_tensor("quant_zero", false),
        string_tensor("compute_dtype", &format!("torch.{}", dtype.torch_name())),
        flag_tensor("offload_meta", false),
        flag_tensor("encoded_state_dict", true),
        flag_tensor("stores_quant_config", true),
        flag_tensor("channel_wise", true),
        flag_tensor("optimize", config.bool("optimize")),
        flag_tensor("round_zero", round_zero(config)),
    ]
}

impl QuantMethod for Hqq {
    type Observer = NoCalibration;

    fn info(&self) -> MethodInfo {
        MethodInfo {
            name: "hqq".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "HQQ half-quadratic zero-point fitting, 1-8 bits, no calibration (hqq library format)".into(),
            answers_to: vec![json!({"quant_method": "hqq"}).as_object().unwrap().clone()],
            flags: Flags {
                requires_calibration: false,
                requires_parameters_quantization: true,
                is_serializable: true,
                is_trainable: true,
            },
            required_packages: vec![],
            options: vec![
                OptionSpec::int_choice("nbits", 4, &[1, 2, 3, 4, 8], "bits per weight"),
                OptionSpec::int("group_size", 64, 8, 1 << 24, "weights per group (a multiple of 8, dividing the weight's size)"),
                OptionSpec::int_choice("axis", 1, &[0, 1], "1: groups of consecutive inputs; 0: groups strided along the outputs"),
                OptionSpec::bool("round_zero", false, "round the initial zero point (default: at 4 bits only, as hqq)").optional(),
                OptionSpec::bool("optimize", true, "fit zero points with the half-quadratic solver (false: plain min-max)"),
                OptionSpec::float("lp_norm", 0.7, 0.1, 1.0, "p of the lp-norm error the solver minimises"),
                OptionSpec::float("beta", 10.0, 1e-6, 1e12, "initial beta of the half-quadratic splitting"),
                OptionSpec::float("kappa", 1.01, 1.0, 10.0, "beta grows by this factor per iteration (1: hqq 0.2.8's default solver)"),
                OptionSpec::int("iters", 20, 1, 10_000, "most solver iterations per group"),
                OptionSpec::bool("early_stop", true, "stop a group when its squared error stops falling"),
                OptionSpec::bool("integer_zero", false, "kvant: keep zero points integers so 0 stays exact (default: below 4 bits)").optional(),
                OptionSpec::choice("compute_dtype", "", &["float16", "bfloat16", "float32"], "dtype of scale, zero and bias (default: the weight's)").optional(),
                OptionSpec::choice(
                    "export_format",
                    "hqq",
                    &["hqq", "gptq"],
                    "hqq: hqq's own layout; gptq: the GPTQ layout GPTQModel/transformers/vLLM load (integer zeros, axis 1)",
                ),
                OptionSpec::choice(
                    "checkpoint_format",
                    "",
                    &["gptq_v2", "gptq"],
                    "with export_format gptq: gptq_v2 (default; GPTQModel, transformers) or gptq (v1, zero - 1 stored)",
                )
                .optional(),
            ],
            tolerance: 0.15,
            forward_tolerance: kvant_plugin_api::DEFAULT_FORWARD_TOLERANCE,
            read_only: false,
            config_files: Vec::new(),
        }
    }

    fn check_config(&self, config: &Config) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        let g = config.int("group_size");
        if g % 8 != 0 {
            problems.push(ConfigProblem::new("group_size", format!("hqq needs a multiple of 8, got {g}")));
        }
        if gptq_export(config) {
            let why = "with export_format = \"gptq\"";
            if config.int("axis") != 1 {
                problems.push(ConfigProblem::new("axis", format!("{why} groups are consecutive inputs of a row: axis must be 1")));
            }
            if config.int("nbits") == 1 {
                problems.push(ConfigProblem::new("nbits", format!("{why} nbits must be 2, 3, 4 or 8 (GPTQ's widths)")));
            }
            if config.get("integer_zero").and_then(Value::as_bool) == Some(false) {
                problems.push(ConfigProblem::new("integer_zero", format!("{why} zero points are stored as integers: integer_zero cannot be false")));
            }
            if config.opt_str("compute_dtype").is_some() {
                problems.push(ConfigProblem::new("compute_dtype", format!("{why} scales and bias are stored in F16")));
            }
        } else if config.opt_str("checkpoint_format").is_some() {
            problems.push(ConfigProblem::new("checkpoint_format", "applies to export_format = \"gptq\" only"));
        }
        problems
    }

    fn config_from_checkpoint(&self, qc: &Map<String, Value>) -> Result<Map<String, Value>> {
        // transformers writes {"quant_config": {"weight_quant_params": {...}}, "quant_method": "hqq", ...};
        // per-layer-type configs (dynamic_config) have no single set of options: each module's
        // own tensors say how it is stored, so defaults do then.
        let params = qc.get("quant_config").and_then(|c| c.get("weight_quant_params")).and_then(Value::as_object);
        let keys = ["nbits", "group_size", "axis", "round_zero", "optimize"];
        let mut options: Map<String, Value> = params
            .map(|p| p.iter().filter(|(k, v)| keys.contains(&k.as_str()) && !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        // hqq always writes round_zero; when it is hqq's own rule for nbits, it reads back as unset.
        let nbits = options.get("nbits").and_then(Value::as_i64).unwrap_or(4);
        if options.get("round_zero").and_then(Value::as_bool) == Some(nbits == 4) {
            options.remove("round_zero");
        }
        Ok(options)
    }

    fn plan_linear(&self, module: &Module, config: &Config) -> Result<Option<ModulePlan>> {
        let (out, inp) = module.linear_shape().expect("host passes Linear modules only");
        if gptq_export(config) {
            return Ok(match gptq_layout(out, inp, config) {
                Ok(l) => Some(ModulePlan { name: module.name.clone(), shape: (out, inp), tensors: l.specs(module.has_bias()), attrs: json!(null) }),
                Err(e) => {
                    log::warn!("`{}` stays dense: {e}", module.name);
                    None
                }
            });
        }
        let l = match layout(out, inp, config) {
            Ok(l) => l,
            Err(e) => {
                // hqq's format cannot hold it (size not a multiple of the group, or rows that do
                // not pack): keep this Linear dense rather than fail the whole model.
                log::warn!("`{}` stays dense: {e}", module.name);
                return Ok(None);
            }
        };
        let dtype = compute_dtype(module.weight_dtype(), config);
        let mut tensors = vec![
            l.w_q_spec(),
            TensorSpec::new("scale", dtype, l.meta_shape()),
            TensorSpec::new("zero", dtype, l.meta_shape()),
        ];
        tensors.extend(meta_tensors(&l, dtype, config).iter().map(Tensor::spec));
        if let Some(b) = module.tensors.iter().find(|t| t.name == "bias") {
            tensors.push(TensorSpec::new("bias", dtype, b.shape.clone()));
        }
        Ok(Some(ModulePlan { name: module.name.clone(), shape: (out, inp), tensors, attrs: json!(null) }))
    }

    fn quantize(&self, weights: &ModuleTensors<'_>, _: Option<&NoCalibration>, config: &Config) -> Result<Quantized> {
        let (out, inp) = weights.plan.shape;
        let weight = weights.get("weight")?;
        let w = weight.as_f32();
        let (mut tensors, sq_error, dtype) = if gptq_export(config) {
            let (tensors, sq_error) = gptq_layout(out, inp, config)?.quantize(&w, &solver_params(config));
            (tensors, sq_error, DType::F16)
        } else {
            let l = layout(out, inp, config)?;
            let dtype = compute_dtype(Some(weight.dtype), config);
            let (w_q, scale, zero, sq_error) = l.quantize(&w, &solver_params(config));
            let spec = l.w_q_spec();
            let mut tensors = vec![
                Tensor { name: spec.name, dtype: spec.dtype, shape: spec.shape, data: w_q },
                Tensor::from_f32_as("scale", dtype, l.meta_shape(), &scale),
                Tensor::from_f32_as("zero", dtype, l.meta_shape(), &zero),
            ];
            tensors.extend(meta_tensors(&l, dtype, config));
            (tensors, sq_error, dtype)
        };
        if let Some(b) = weights.find("bias") {
            tensors.push(Tensor::from_f32_as("bias", dtype, b.shape.to_vec(), &b.to_f32()));
        }
        let norm: f64 = w.par_iter().map(|&v| (v as f64) * (v as f64)).sum();
        let loss = if norm > 0.0 { (sq_error / norm).sqrt() } else { sq_error.sqrt() };
        Ok(Quantized { tensors, loss: Some(loss), input_scale: None })
    }

    fn process_model_after_weight_loading(&self, _summary: &Summary, config: &Config) -> Result<Map<String, Value>> {
        if gptq_export(config) {
            return Ok(gptq_quantization_config(config));
        }
        // What transformers' prepare_for_hqq_linear stores for an HqqConfig (hqq's
        // BaseQuantizeConfig), keys sorted as config.json writes them.
        let qc = json!({
            "quant_config": {
                "offload_meta": false,
                "scale_quant_params": null,
                "weight_quant_params": {
                    "axis": config.int("axis"),
                    "channel_wise": true,
                    "group_size": config.int("group_size"),
                    "nbits": config.int("nbits"),
                    "optimize": config.bool("optimize"),
                    "round_zero": round_zero(config),
                    "view_as_float": false,
                },
                "zero_quant_params": null,
            },
            "quant_method": "hqq",
            "skip_modules": ["lm_head"],
        });
        Ok(qc.as_object().unwrap().clone())
    }

    fn linear_shape(&self, module: &ModuleTensors<'_>, config: &Config) -> Result<(usize, usize)> {
        if gptq_export(config) {
            let l = gptq_read(module, config)?.layout;
            return Ok((l.out, l.inp));
        }
        let p = Packed::read(&module.plan.name, |n| module.get(n))?;
        Ok((p.layout.out, p.layout.inp))
    }

    fn dequantize(&self, module: &ModuleTensors<'_>, config: &Config) -> Result<Vec<f32>> {
        if gptq_export(config) {
            return Ok(gptq_read(module, config)?.dequantize());
        }
        Ok(Packed::read(&module.plan.name, |n| module.get(n))?.dequantize())
    }

    fn forward(&self, module: &ModuleTensors<'_>, x: &[f32], rows: usize, config: &Config) -> Result<Vec<f32>> {
        if gptq_export(config) {
            // The export is read back by the `gptq` method; here only the host's checks of the
            // fresh output run it, so one dequantization and a matrix product do.
            let w = gptq_read(module, config)?;
            let (out, inp) = (w.layout.out, w.layout.inp);
            if x.len() != rows * inp {
                return Err(Error::new(format!("`{}`: input is not [{rows}, {inp}]", module.plan.name)));
            }
            let bias = module.find("bias").map(|b| b.to_f32());
            return Ok(dense::linear_forward(x, rows, &w.dequantize(), (out, inp), bias.as_deref()));
        }
        let p = Packed::read(&module.plan.name, |n| module.get(n))?;
        let (out, inp) = (p.layout.out, p.layout.inp);
        if x.len() != rows * inp {
            return Err(Error::new(format!("`{}`: input is not [{rows}, {inp}]", module.plan.name)));
        }
        let bias = module.find("bias").map(|b| b.to_f32());
        if rows > SMALL_BATCH {
            // Many rows amortise one dequantization; a matrix product then beats decoding per row.
            return Ok(dense::linear_forward(x, rows, &p.dequantize(), (out, inp), bias.as_deref()));
        }
        // Few rows (token-by-token decoding): decode one output channel at a time from the
        // packed codes, never holding the dense matrix.
        let per_channel: Vec<f32> = (0..out)
            .into_par_iter()
            .flat_map_iter(|o| {
                let mut w = vec![0f32; inp];
                p.dequantize_range(o * inp, &mut w);
                let b = bias.as_ref().map_or(0.0, |b| b[o]);
                x.chunks(inp).map(move |xr| w.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>() + b).collect::<Vec<_>>()
            })
            .collect();
        // per_channel is [out, rows]; y is [rows, out].
        Ok((0..rows * out).map(|i| per_channel[(i % out) * rows + i / out]).collect())
    }
}

/// Up to this many rows, `forward` decodes per output channel instead of dequantizing whole.
const SMALL_BATCH: usize = 8;

export_plugin!(Hqq);
