//! The kvant methods `bnb-nf4`, `bnb-fp4` and `bnb-int8`: checkpoints laid out exactly as
//! transformers + bitsandbytes save them, options and `quantization_config` under transformers'
//! `BitsAndBytesConfig` key names.

use kvant_plugin_api::{
    Config, ConfigProblem, DType, Error, Flags, MethodInfo, Module, ModulePlan, ModuleTensors, NoCalibration,
    OptionSpec, QuantMethod, Quantized, Result, Summary, Tensor, TensorSpec, TensorView, DEFAULT_FORWARD_TOLERANCE,
};
use rayon::prelude::*;
use serde_json::{json, Map, Value};

use crate::double_quant::{self, NestedAbsmax, NESTED_BLOCKSIZE};
use crate::forward::{self, Weight4};
use crate::four_bit::{self, QuantType};
use crate::input::Floats;
use crate::int8::{self, Int8Weight, WEIGHT_FORMAT_ROW};
use crate::quant_state::{NestedMeta, QuantStateMeta};

const BLOCKSIZES: [i64; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Longest `nested_offset` Python can print for an F32 value: sign, 17 digits, point, `e-XX`.
const MAX_OFFSET_REPR: usize = 24;

/// The options of all three methods: every `BitsAndBytesConfig` key, so that the written
/// `quantization_config` is complete, plus kvant's own `bnb_4bit_blocksize`.
fn options(default_quant_type: &str) -> Vec<OptionSpec> {
    vec![
        OptionSpec::choice("bnb_4bit_quant_type", default_quant_type, &["nf4", "fp4"], "4-bit data type"),
        OptionSpec::bool(
            "bnb_4bit_use_double_quant",
            false,
            "quantize the per-block absmax again (8-bit, blocks of 256): about 0.37 bit per weight less",
        ),
        OptionSpec::choice(
            "bnb_4bit_compute_dtype",
            "float32",
            &["float32", "float16", "bfloat16"],
            "dtype transformers computes 4-bit layers in (recorded; kvant computes in F32)",
        ),
        OptionSpec::choice(
            "bnb_4bit_quant_storage",
            "uint8",
            &["uint8", "int8", "float16", "bfloat16", "float32", "float64"],
            "dtype the packed 4-bit bytes are stored as (the bytes are the same)",
        ),
        OptionSpec::int_choice(
            "bnb_4bit_blocksize",
            64,
            &BLOCKSIZES,
            "kvant's own key: weights per absmax (transformers always uses 64; the checkpoint records it)",
        ),
        OptionSpec::float(
            "llm_int8_threshold",
            6.0,
            0.0,
            1e9,
            "int8 forward: input columns with any |x| at or above this run in F32 (0: none)",
        ),
        OptionSpec::string_list("llm_int8_skip_modules", true, "modules left dense: any whose name contains one of these"),
        OptionSpec::bool("llm_int8_enable_fp32_cpu_offload", false, "recorded for transformers; no effect in kvant"),
        OptionSpec::bool("llm_int8_has_fp16_weight", false, "keep F16 weights next to int8 (not supported: must be false)"),
    ]
}

fn flags() -> Flags {
    Flags {
        requires_calibration: false,
        requires_parameters_quantization: true,
        is_serializable: true,
        // QLoRA trains adapters over NF4; LLM.int8 layers are trainable the same way.
        is_trainable: true,
    }
}

fn common_problems(config: &Config) -> Vec<ConfigProblem> {
    if config.bool("llm_int8_has_fp16_weight") {
        vec![ConfigProblem::new("llm_int8_has_fp16_weight", "kvant writes int8 weights only; must be false")]
    } else {
        vec![]
    }
}

/// transformers leaves a module dense when its name contains any of `llm_int8_skip_modules`.
fn skipped(module: &Module, config: &Config) -> bool {
    config.str_list("llm_int8_skip_modules").iter().any(|p| module.name.contains(p.as_str()))
}

/// `quantization_config` as transformers' `BitsAndBytesConfig.to_dict()` writes it, keys in its order.
fn quantization_config(config: &Config, four_bit: bool) -> Map<String, Value> {
    let v = |k: &str| config.values().get(k).cloned().unwrap_or(Value::Null);
    let mut qc = Map::new();
    qc.insert("quant_method".into(), "bitsandbytes".into());
    qc.insert("_load_in_8bit".into(), (!four_bit).into());
    qc.insert("_load_in_4bit".into(), four_bit.into());
    for k in [
        "llm_int8_threshold",
        "llm_int8_skip_modules",
        "llm_int8_enable_fp32_cpu_offload",
        "llm_int8_has_fp16_weight",
        "bnb_4bit_quant_type",
        "bnb_4bit_use_double_quant",
        "bnb_4bit_compute_dtype",
        "bnb_4bit_quant_storage",
    ] {
        qc.insert(k.into(), v(k));
    }
    qc.insert("load_in_4bit".into(), four_bit.into());
    qc.insert("load_in_8bit".into(), (!four_bit).into());
    qc
}

fn answers_to(entries: Value) -> Vec<Map<String, Value>> {
    entries.as_array().expect("a list").iter().map(|e| e.as_object().expect("an object").clone()).collect()
}

fn copy_bias(weights: &ModuleTensors<'_>, tensors: &mut Vec<Tensor>) {
    if let Some(b) = weights.find("bias") {
        tensors.push(Tensor { name: "bias".into(), dtype: b.dtype, shape: b.shape.to_vec(), data: b.data.to_vec() });
    }
}

fn dense_weight<'a>(weights: &ModuleTensors<'a>) -> Result<(TensorView<'a>, Floats<'a>)> {
    let w = weights.get("weight")?;
    let src = Floats::new(w.dtype, w.data).map_err(|e| Error::new(format!("`{}.weight`: {e}", weights.plan.name)))?;
    Ok((w, src))
}

/// `bnb-nf4` and `bnb-fp4`: bitsandbytes' `Linear4bit` layout.
pub struct Bnb4 {
    quant_type: QuantType,
}

impl Bnb4 {
    /// The `bnb-nf4` method.
    pub fn nf4() -> Self {
        Bnb4 { quant_type: QuantType::Nf4 }
    }

    /// The `bnb-fp4` method.
    pub fn fp4() -> Self {
        Bnb4 { quant_type: QuantType::Fp4 }
    }

    fn state_key(&self) -> String {
        format!("weight.quant_state.bitsandbytes__{}", self.quant_type.name())
    }

    /// The quant state of a module about to be quantized, with `offset` once it is known.
    fn meta(&self, config: &Config, dtype: DType, shape: (usize, usize), offset: Option<f32>) -> QuantStateMeta {
        let nested = config.bool("bnb_4bit_use_double_quant").then(|| NestedMeta {
            blocksize: NESTED_BLOCKSIZE,
            dtype: DType::F32,
            offset: offset.unwrap_or(0.0),
        });
        QuantStateMeta {
            quant_type: self.quant_type,
            blocksize: config.int("bnb_4bit_blocksize") as usize,
            dtype,
            shape: vec![shape.0, shape.1],
            nested,
        }
    }

    /// The quant state's spec. Without double quant its JSON is known from the plan; with it, the
    /// JSON holds the offset, whose digits are only known after quantizing, so the plan gives a
    /// variable length bounded by the longest offset Python prints.
    fn state_spec(&self, meta: &QuantStateMeta) -> TensorSpec {
        let len = meta.to_bytes().len();
        match meta.nested {
            Some(_) => TensorSpec::variable(self.state_key(), DType::U8, len - "0.0".len() + MAX_OFFSET_REPR),
            None => TensorSpec::new(self.state_key(), DType::U8, [len]),
        }
    }

    /// The quant state's JSON, exactly the bytes bitsandbytes writes.
    fn quant_state_tensor(&self, meta: &QuantStateMeta) -> Tensor {
        let bytes = meta.to_bytes();
        Tensor { name: self.state_key(), dtype: DType::U8, shape: vec![bytes.len()], data: bytes }
    }

    /// The module's quant state, weight bytes and F32 absmax, read from its tensors.
    fn read<'a>(&self, module: &ModuleTensors<'a>) -> Result<(QuantStateMeta, &'a [u8], Vec<f32>)> {
        let name = &module.plan.name;
        let state = module.get(&self.state_key())?;
        let meta = QuantStateMeta::from_bytes(state.data).map_err(|e| Error::new(format!("`{name}`: {e}")))?;
        let n: usize = meta.shape.iter().product();
        let nblocks = n.div_ceil(meta.blocksize);
        let weight = module.get("weight")?;
        if weight.data.len() < n.div_ceil(2) {
            return Err(Error::new(format!("`{name}.weight` has {} bytes, {n} codes need {}", weight.data.len(), n.div_ceil(2))));
        }
        let absmax_t = module.get("weight.absmax")?;
        let absmax = match &meta.nested {
            Some(nm) => {
                let nested = NestedAbsmax {
                    codes: absmax_t.data.to_vec(),
                    nested_absmax: module.get("weight.nested_absmax")?.to_f32(),
                    offset: nm.offset,
                };
                if absmax_t.dtype != DType::U8 || nested.codes.len() != nblocks || nested.nested_absmax.len() != nblocks.div_ceil(nm.blocksize) {
                    return Err(Error::new(format!("`{name}`: double-quantized absmax does not fit {nblocks} blocks")));
                }
                double_quant::decompress(&nested)
            }
            None => {
                let a = absmax_t.to_f32();
                if a.len() != nblocks {
                    return Err(Error::new(format!("`{name}.weight.absmax` has {} values for {nblocks} blocks", a.len())));
                }
                a
            }
        };
        Ok((meta, weight.data, absmax))
    }
}

impl QuantMethod for Bnb4 {
    type Observer = NoCalibration;

    fn info(&self) -> MethodInfo {
        let qt = self.quant_type.name();
        MethodInfo {
            name: format!("bnb-{qt}"),
            version: env!("CARGO_PKG_VERSION").into(),
            description: format!("bitsandbytes {} (4-bit blockwise), byte-exact with bitsandbytes 0.50", qt.to_uppercase()),
            answers_to: answers_to(json!([
                {"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": qt}
            ])),
            flags: flags(),
            // The double-quant quant_state is planned with a variable length (contract 1.2).
            required_packages: vec!["host:>=1.2".into()],
            options: options(qt),
            tolerance: match self.quant_type {
                QuantType::Nf4 => 0.12,
                QuantType::Fp4 => 0.16,
            },
            // The packed forward decodes the same weights; only the sums' order differs.
            forward_tolerance: DEFAULT_FORWARD_TOLERANCE,
            read_only: false,
            config_files: Vec::new(),
        }
    }

    fn check_config(&self, config: &Config) -> Vec<ConfigProblem> {
        let mut problems = common_problems(config);
        let qt = self.quant_type.name();
        if config.str("bnb_4bit_quant_type") != qt {
            let other = config.str("bnb_4bit_quant_type");
            problems.push(ConfigProblem::new(
                "bnb_4bit_quant_type",
                format!("method bnb-{qt} writes {qt}; use bnb-{other} for {other}"),
            ));
        }
        problems
    }

    fn plan_linear(&self, module: &Module, config: &Config) -> Result<Option<ModulePlan>> {
        if skipped(module, config) {
            return Ok(None);
        }
        let (out, inp) = module.linear_shape().expect("host passes Linear modules only");
        let dtype = module.weight_dtype().expect("a Linear has a weight");
        let meta = self.meta(config, dtype, (out, inp), None);
        let n = out * inp;
        let nblocks = n.div_ceil(meta.blocksize);
        let storage = DType::parse(config.str("bnb_4bit_quant_storage")).expect("a published choice");
        let bytes = n.div_ceil(2);
        if bytes % storage.size() != 0 {
            return Err(Error::new(format!(
                "`{}`: {bytes} packed bytes cannot be stored as {}; use bnb_4bit_quant_storage=uint8",
                module.name,
                storage.torch_name()
            )));
        }
        let mut tensors = vec![TensorSpec::new("weight", storage, [bytes / storage.size(), 1])];
        if meta.nested.is_some() {
            tensors.push(TensorSpec::new("weight.absmax", DType::U8, [nblocks]));
            tensors.push(TensorSpec::new("weight.quant_map", DType::F32, [16]));
            tensors.push(TensorSpec::new("weight.nested_absmax", DType::F32, [nblocks.div_ceil(NESTED_BLOCKSIZE)]));
            tensors.push(TensorSpec::new("weight.nested_quant_map", DType::F32, [256]));
        } else {
            tensors.push(TensorSpec::new("weight.absmax", DType::F32, [nblocks]));
            tensors.push(TensorSpec::new("weight.quant_map", DType::F32, [16]));
        }
        tensors.push(self.state_spec(&meta));
        tensors.extend(module.tensors.iter().filter(|t| t.name == "bias").cloned());
        Ok(Some(ModulePlan { name: module.name.clone(), shape: (out, inp), tensors, attrs: Value::Null }))
    }

    fn quantize(&self, weights: &ModuleTensors<'_>, _: Option<&NoCalibration>, config: &Config) -> Result<Quantized> {
        let plan = weights.plan;
        let (w, src) = dense_weight(weights)?;
        let blocksize = config.int("bnb_4bit_blocksize") as usize;
        let q = four_bit::quantize(src, blocksize, self.quant_type)?;
        let spec = |name: &str| plan.tensors.iter().find(|t| t.name == name).expect("planned");
        let weight_spec = spec("weight");
        let mut tensors = vec![Tensor { name: "weight".into(), dtype: weight_spec.dtype, shape: weight_spec.shape.clone(), data: q.packed }];
        let codes = self.quant_type.codes();
        let offset = if config.bool("bnb_4bit_use_double_quant") {
            let nested = double_quant::compress(&q.absmax);
            tensors.push(Tensor::from_slice("weight.absmax", DType::U8, [nested.codes.len()], &nested.codes));
            tensors.push(Tensor::f32("weight.quant_map", [16], &codes));
            tensors.push(Tensor::f32("weight.nested_absmax", [nested.nested_absmax.len()], &nested.nested_absmax));
            tensors.push(Tensor::f32("weight.nested_quant_map", [256], double_quant::dynamic_map()));
            Some(nested.offset)
        } else {
            tensors.push(Tensor::f32("weight.absmax", [q.absmax.len()], &q.absmax));
            tensors.push(Tensor::f32("weight.quant_map", [16], &codes));
            None
        };
        let meta = self.meta(config, w.dtype, plan.shape, offset);
        tensors.push(self.quant_state_tensor(&meta));
        copy_bias(weights, &mut tensors);
        Ok(Quantized::tensors(tensors))
    }

    fn process_model_after_weight_loading(&self, _: &Summary, config: &Config) -> Result<Map<String, Value>> {
        Ok(quantization_config(config, true))
    }

    fn linear_shape(&self, module: &ModuleTensors<'_>, _: &Config) -> Result<(usize, usize)> {
        let state = module.get(&self.state_key())?;
        let meta = QuantStateMeta::from_bytes(state.data).map_err(|e| Error::new(format!("`{}`: {e}", module.plan.name)))?;
        match meta.shape[..] {
            [out, inp] => Ok((out, inp)),
            _ => Err(Error::new(format!("`{}`: quant_state shape {:?} is not a Linear's", module.plan.name, meta.shape))),
        }
    }

    /// As bitsandbytes dequantizes: F32 products rounded to the original dtype (exact in F32).
    fn dequantize(&self, module: &ModuleTensors<'_>, _: &Config) -> Result<Vec<f32>> {
        let (meta, packed, absmax) = self.read(module)?;
        let n = meta.shape.iter().product();
        let mut w = four_bit::dequantize(packed, &absmax, n, meta.blocksize, meta.quant_type)?;
        // Rounded to the original dtype in place, in parallel.
        match meta.dtype {
            DType::F32 => {}
            DType::F16 => w.par_iter_mut().for_each(|v| *v = half::f16::from_f32(*v).to_f32()),
            DType::BF16 => w.par_iter_mut().for_each(|v| *v = half::bf16::from_f32(*v).to_f32()),
            other => return Err(Error::new(format!("`{}`: quant_state dtype {other} is not F32, F16 or BF16", module.plan.name))),
        }
        Ok(w)
    }

    fn forward(&self, module: &ModuleTensors<'_>, x: &[f32], rows: usize, _: &Config) -> Result<Vec<f32>> {
        let (meta, packed, absmax) = self.read(module)?;
        let (out, inp) = match meta.shape[..] {
            [o, i] => (o, i),
            _ => return Err(Error::new(format!("`{}`: not a Linear", module.plan.name))),
        };
        let w = Weight4 {
            packed,
            absmax: &absmax,
            rows: out,
            cols: inp,
            blocksize: meta.blocksize,
            quant_type: meta.quant_type,
            dtype: meta.dtype,
        };
        let bias = module.find("bias").map(|b| b.to_f32());
        forward::forward(&w, x, rows, bias.as_deref())
    }
}

/// `bnb-int8`: bitsandbytes' `Linear8bitLt` layout (LLM.int8()).
pub struct BnbInt8;

impl BnbInt8 {
    fn read(module: &ModuleTensors<'_>) -> Result<Int8Weight> {
        let name = &module.plan.name;
        let w = module.get("weight")?;
        let scb = module.get("SCB")?.to_f32();
        let (rows, cols) = match w.shape {
            [r, c] if w.dtype == DType::I8 && scb.len() == *r => (*r, *c),
            _ => return Err(Error::new(format!("`{name}`: weight {} {:?} with {} SCB values is not int8 [out, in]", w.dtype, w.shape, scb.len()))),
        };
        if let Some(f) = module.find("weight_format") {
            if f.data.first().is_some_and(|&b| b != WEIGHT_FORMAT_ROW) {
                return Err(Error::new(format!("`{name}`: weight_format {} is not row-major (0)", f.data[0])));
            }
        }
        let cb = w.data.iter().map(|&b| b as i8).collect();
        Ok(Int8Weight { cb, scb, rows, cols })
    }
}

impl QuantMethod for BnbInt8 {
    type Observer = NoCalibration;

    fn info(&self) -> MethodInfo {
        MethodInfo {
            name: "bnb-int8".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "bitsandbytes LLM.int8(): row-wise int8 with outlier decomposition, byte-exact with bitsandbytes 0.50".into(),
            answers_to: answers_to(json!([{"quant_method": "bitsandbytes", "load_in_8bit": true}])),
            flags: flags(),
            required_packages: vec![],
            // transformers' default for the (unused) 4-bit keys
            options: options("fp4"),
            tolerance: 0.02,
            // LLM.int8's forward also rounds each input row to int8 (steps of the row's absmax / 127),
            // which dequantize + matmul does not. That error is uniform within half a step, rms
            // step / sqrt(12): for Gaussian rows of a few hundred values (absmax about 3 sigma), 0.7 %
            // of the inputs' rms, and so of the outputs'. `kvant plugin check` measures 0.2-1.1 % on
            // its 3-row batches; 3 % allows for that spread.
            forward_tolerance: 0.03,
            read_only: false,
            config_files: Vec::new(),
        }
    }

    fn check_config(&self, config: &Config) -> Vec<ConfigProblem> {
        common_problems(config)
    }

    fn plan_linear(&self, module: &Module, config: &Config) -> Result<Option<ModulePlan>> {
        if skipped(module, config) {
            return Ok(None);
        }
        let (out, inp) = module.linear_shape().expect("host passes Linear modules only");
        let mut tensors = vec![
            TensorSpec::new("weight", DType::I8, [out, inp]),
            TensorSpec::new("SCB", DType::F32, [out]),
            TensorSpec::new("weight_format", DType::U8, []),
        ];
        tensors.extend(module.tensors.iter().filter(|t| t.name == "bias").cloned());
        Ok(Some(ModulePlan { name: module.name.clone(), shape: (out, inp), tensors, attrs: Value::Null }))
    }

    fn quantize(&self, weights: &ModuleTensors<'_>, _: Option<&NoCalibration>, _: &Config) -> Result<Quantized> {
        let (out, inp) = weights.plan.shape;
        let (_, src) = dense_weight(weights)?;
        let q = int8::quantize(src, out, inp)?;
        let cb: Vec<u8> = q.cb.iter().map(|&v| v as u8).collect();
        let mut tensors = vec![
            Tensor { name: "weight".into(), dtype: DType::I8, shape: vec![out, inp], data: cb },
            Tensor::f32("SCB", [out], &q.scb),
            Tensor { name: "weight_format".into(), dtype: DType::U8, shape: vec![], data: vec![WEIGHT_FORMAT_ROW] },
        ];
        copy_bias(weights, &mut tensors);
        Ok(Quantized::tensors(tensors))
    }

    fn process_model_after_weight_loading(&self, _: &Summary, config: &Config) -> Result<Map<String, Value>> {
        Ok(quantization_config(config, false))
    }

    fn linear_shape(&self, module: &ModuleTensors<'_>, _: &Config) -> Result<(usize, usize)> {
        let w = Self::read(module)?;
        Ok((w.rows, w.cols))
    }

    fn dequantize(&self, module: &ModuleTensors<'_>, _: &Config) -> Result<Vec<f32>> {
        Ok(int8::dequantize(&Self::read(module)?))
    }

    fn forward(&self, module: &ModuleTensors<'_>, x: &[f32], rows: usize, config: &Config) -> Result<Vec<f32>> {
        let w = Self::read(module)?;
        let bias = module.find("bias").map(|b| b.to_f32());
        int8::forward(&w, x, rows, config.float("llm_int8_threshold") as f32, bias.as_deref())
    }
}
