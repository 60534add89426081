//! AWQ (Lin et al., 2023): activation-aware weight quantization. Input channels that carry
//! large activations are scaled up before 4-bit rounding and the inverse scale is folded into
//! the op producing the input (by the host, which owns the graph), then each group of weights
//! is clipped where that lowers the output error.
//!
//! Writes AutoAWQ's GEMM layout (`quant_method: awq`, `version: gemm`), per converted Linear `P`:
//! `P.qweight` I32 `[in, out/8]`, `P.qzeros` I32 `[groups, out/8]` (see [`packing`]),
//! `P.scales` F16 `[groups, out]`, `P.bias` F16 when present; weight `(q - zero) * scale` with
//! input `i` in group `i / group_size`; the last group may be short (`groups = ceil(in /
//! group_size)`). Reads GEMM and GEMV checkpoints. Linears whose output width is not a
//! multiple of 8 stay dense.

pub mod packing;
pub mod search;

use kvant_plugin_api::{
    dense, export_plugin, Config, ConfigProblem, DType, Error, Flags, MethodInfo, Module, ModulePlan, ModuleTensors,
    OptionSpec, Plan, QuantMethod, Quantized, Result, Skeleton, Summary, Tensor, TensorSpec,
};
use rayon::prelude::*;
use serde_json::{json, Map, Value};

pub use search::{AwqObserver, QuantParams};

/// The `awq` method.
pub struct Awq;

fn params(config: &Config, inp: usize) -> QuantParams {
    let g = config.int("group_size");
    QuantParams { group_size: if g <= 0 { inp } else { g as usize }, zero_point: config.bool("zero_point") }
}

/// AutoAWQ leaves q and k unclipped: their errors pass through the softmax, not linearly.
fn clips(name: &str, config: &Config) -> bool {
    let short = name.rsplit('.').next().unwrap_or(name);
    config.bool("apply_clip") && !["q_", "k_", "query", "key", "Wqkv"].iter().any(|p| short.contains(p))
}

/// The GEMM tensors of an `out x inp` Linear.
fn tensor_specs(out: usize, inp: usize, p: &QuantParams, bias: bool) -> Vec<TensorSpec> {
    let groups = inp.div_ceil(p.group_size);
    let mut specs = vec![
        TensorSpec::new("qweight", DType::I32, [inp, out / 8]),
        TensorSpec::new("qzeros", DType::I32, [groups, out / 8]),
        TensorSpec::new("scales", DType::F16, [groups, out]),
    ];
    if bias {
        specs.push(TensorSpec::new("bias", DType::F16, [out]));
    }
    specs
}

/// Rounds `w` (`[out, inp]`, already scaled and clipped) to 4-bit codes and packs them.
pub fn encode(w: &[f32], out: usize, inp: usize, p: &QuantParams) -> Vec<Tensor> {
    let groups = inp.div_ceil(p.group_size);
    // Per output row: its codes and, per group, scale and zero.
    let rows: Vec<(Vec<u8>, Vec<(f32, f32)>)> = w
        .par_chunks(inp)
        .map(|row| {
            let mut codes = vec![0u8; inp];
            let mut sz = Vec::with_capacity(groups);
            for r in p.groups(inp) {
                let (s, z) = p.scale_zero(&row[r.clone()], true);
                for k in r {
                    codes[k] = QuantParams::code(s, z, row[k]) as u8;
                }
                sz.push((s, z));
            }
            (codes, sz)
        })
        .collect();
    let mut codes_t = vec![0u8; inp * out];
    let mut zeros = vec![0u8; groups * out];
    let mut scales = vec![0f32; groups * out];
    for (o, (codes, sz)) in rows.iter().enumerate() {
        for (i, &c) in codes.iter().enumerate() {
            codes_t[i * out + o] = c;
        }
        for (g, &(s, z)) in sz.iter().enumerate() {
            zeros[g * out + o] = z as u8;
            scales[g * out + o] = s;
        }
    }
    vec![
        Tensor::from_slice("qweight", DType::I32, [inp, out / 8], &packing::pack_gemm(&codes_t, inp, out)),
        Tensor::from_slice("qzeros", DType::I32, [groups, out / 8], &packing::pack_gemm(&zeros, groups, out)),
        Tensor::from_f32_as("scales", DType::F16, [groups, out], &scales),
    ]
}

fn with_bias(mut tensors: Vec<Tensor>, m: &ModuleTensors<'_>) -> Vec<Tensor> {
    if let Some(b) = m.find("bias") {
        tensors.push(Tensor::from_f32_as("bias", DType::F16, [m.plan.shape.0], &b.to_f32()));
    }
    tensors
}

impl QuantMethod for Awq {
    type Observer = AwqObserver;

    fn info(&self) -> MethodInfo {
        MethodInfo {
            name: "awq".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "AWQ: activation-aware scaled and clipped 4-bit weights in AutoAWQ's GEMM format".into(),
            answers_to: vec![json!({"quant_method": "awq"}).as_object().unwrap().clone()],
            flags: Flags {
                requires_calibration: true,
                requires_parameters_quantization: false,
                is_serializable: true,
                is_trainable: false,
            },
            required_packages: vec!["calibration".into()],
            options: vec![
                OptionSpec::int_choice("bits", 4, &[4], "bits per weight (the AWQ layouts hold 4)"),
                OptionSpec::int("group_size", 128, -1, 1 << 20, "input columns per scale; -1: one group per row"),
                OptionSpec::bool("zero_point", true, "asymmetric levels with a zero point (false: zero fixed at 8)"),
                OptionSpec::choice("version", "gemm", &["gemm", "gemv"], "packed layout (kvant writes gemm; reads both)"),
                OptionSpec::int("n_grid", 20, 1, 1000, "ratios tried by the scale search (alpha = k / n_grid)"),
                OptionSpec::bool("duo_scaling", true, "scale candidates mean|x|^a / w_mean^(1-a) as AutoAWQ (false: mean|x|^a)"),
                OptionSpec::bool("apply_clip", true, "search a clipping range per group of weights (not for q/k)"),
                OptionSpec::float("max_shrink", 0.5, 0.0, 1.0, "largest fraction of the range the clipping search removes"),
                OptionSpec::int("max_sample_rows", 8192, 1, 1 << 24, "calibration rows kept per input for the Gram matrix"),
                OptionSpec::string_list("modules_to_not_convert", true, "module name parts left dense"),
            ],
            tolerance: 0.2,
            forward_tolerance: kvant_plugin_api::DEFAULT_FORWARD_TOLERANCE,
            read_only: false,
            config_files: Vec::new(),
        }
    }

    fn check_config(&self, config: &Config) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        if config.int("group_size") == 0 {
            problems.push(ConfigProblem::new("group_size", "must be -1 (per row) or at least 1, got 0"));
        }
        problems
    }

    fn config_from_checkpoint(&self, qc: &Map<String, Value>) -> Result<Map<String, Value>> {
        // AutoAWQ's own quant_config.json spells some keys differently and the version in capitals.
        let pick = |keys: &[&str]| keys.iter().find_map(|k| qc.get(*k).filter(|v| !v.is_null())).cloned();
        let mut options = Map::new();
        for (key, aliases) in [
            ("bits", &["bits", "w_bit"][..]),
            ("group_size", &["group_size", "q_group_size"][..]),
            ("zero_point", &["zero_point"][..]),
            ("modules_to_not_convert", &["modules_to_not_convert"][..]),
        ] {
            if let Some(v) = pick(aliases) {
                options.insert(key.into(), v);
            }
        }
        if let Some(v) = pick(&["version"]) {
            let v = v.as_str().map(str::to_lowercase).ok_or_else(|| Error::new(format!("AWQ `version` {v} is not a string")))?;
            if v != "gemm" && v != "gemv" {
                return Err(Error::new(format!("AWQ version `{v}` is not supported (gemm and gemv are)")));
            }
            options.insert("version".into(), v.into());
        }
        Ok(options)
    }

    fn process_model_before_weight_loading(&self, skeleton: &Skeleton, config: &Config) -> Result<Plan> {
        if config.str("version") != "gemm" {
            return Err(Error::new("kvant writes AWQ `version` gemm only (gemv checkpoints can be read)"));
        }
        let mut plan = Plan::default();
        for module in skeleton.modules.iter().filter(|m| m.is_convertible_linear()) {
            if let Some(p) = self.plan_linear(module, config)? {
                plan.modules.push(p);
            }
        }
        plan.fold_input_scales = true;
        Ok(plan)
    }

    fn plan_linear(&self, module: &Module, config: &Config) -> Result<Option<ModulePlan>> {
        let (out, inp) = module.linear_shape().expect("host passes Linear modules only");
        if config.str_list("modules_to_not_convert").iter().any(|p| module.name.contains(p.as_str())) {
            return Ok(None);
        }
        if out % 8 != 0 {
            log::warn!("module `{}` ({out}x{inp}) stays dense: AWQ packs 8 output columns per word", module.name);
            return Ok(None);
        }
        let tensors = tensor_specs(out, inp, &params(config, inp), module.has_bias());
        Ok(Some(ModulePlan { name: module.name.clone(), shape: (out, inp), tensors, attrs: Value::Null }))
    }

    fn new_observer(&self, module: &ModulePlan, config: &Config) -> Result<AwqObserver> {
        Ok(AwqObserver::new(module.name.clone(), module.shape.1, config.int("max_sample_rows") as usize))
    }

    /// One module without input scaling (its input has no foldable producer): clipping only.
    fn quantize(&self, weights: &ModuleTensors<'_>, observer: Option<&AwqObserver>, config: &Config) -> Result<Quantized> {
        let (out, inp) = weights.plan.shape;
        let p = params(config, inp);
        let mut w = weights.get("weight")?.to_f32();
        let observed = observer.filter(|o| o.rows() > 0);
        if let Some(o) = observed.filter(|_| clips(&weights.plan.name, config)) {
            search::clip(&mut w, &o.gram(), inp, config.int("n_grid") as usize, config.float("max_shrink"), &p);
        }
        Ok(Quantized::tensors(with_bias(encode(&w, out, inp, &p), weights)))
    }

    fn quantize_group(
        &self,
        members: &[ModuleTensors<'_>],
        observers: &[Option<&AwqObserver>],
        config: &Config,
    ) -> Result<Vec<Quantized>> {
        let first = members.first().ok_or_else(|| Error::new("an empty group"))?;
        let inp = first.plan.shape.1;
        if members.iter().any(|m| m.plan.shape.1 != inp) || observers.len() != members.len() {
            return Err(Error::new(format!("group of `{}`: members must share one input width and have an observer each", first.plan.name)));
        }
        let Some(observer) = observers[0].filter(|o| o.rows() > 0) else {
            // Never reached by calibration: nothing to weigh the scales with.
            log::warn!("group of `{}` saw no calibration rows; quantizing it without scaling", first.plan.name);
            return members.iter().map(|m| self.quantize(m, None, config)).collect();
        };
        let p = params(config, inp);
        let n_grid = config.int("n_grid") as usize;
        let weights: Vec<Vec<f32>> = members.iter().map(|m| m.get("weight").map(|w| w.to_f32())).collect::<Result<_>>()?;
        let refs: Vec<&[f32]> = weights.iter().map(Vec::as_slice).collect();
        let g = observer.gram();
        let found = search::search_scale(&refs, &observer.mean_abs(), &g, n_grid, config.bool("duo_scaling"), &p);
        let s = found.scale;
        // In the scaled space the inputs are x / s: G becomes diag(1/s) G diag(1/s).
        let gs: Vec<f32> = g.iter().enumerate().map(|(k, v)| v / (s[k / inp] * s[k % inp])).collect();
        let mut results = Vec::with_capacity(members.len());
        for ((m, mut w), loss) in members.iter().zip(weights).zip(found.losses) {
            w.par_chunks_mut(inp).for_each(|row| row.iter_mut().zip(&s).for_each(|(v, s)| *v *= s));
            if clips(&m.plan.name, config) {
                search::clip(&mut w, &gs, inp, n_grid, config.float("max_shrink"), &p);
            }
            let tensors = with_bias(encode(&w, m.plan.shape.0, inp, &p), m);
            results.push(Quantized { tensors, loss: Some(loss), input_scale: Some(s.clone()) });
        }
        Ok(results)
    }

    fn process_model_after_weight_loading(&self, _summary: &Summary, config: &Config) -> Result<Map<String, Value>> {
        let mut qc = Map::new();
        qc.insert("quant_method".into(), "awq".into());
        qc.insert("bits".into(), 4.into());
        qc.insert("group_size".into(), config.int("group_size").into());
        qc.insert("zero_point".into(), config.bool("zero_point").into());
        qc.insert("version".into(), "gemm".into());
        qc.insert("modules_to_not_convert".into(), config.get("modules_to_not_convert").cloned().unwrap_or(Value::Null));
        Ok(qc)
    }

    fn linear_shape(&self, module: &ModuleTensors<'_>, config: &Config) -> Result<(usize, usize)> {
        let q = module.get("qweight")?;
        match (q.shape, config.str("version")) {
            ([inp, words], "gemm") => Ok((words * 8, *inp)),
            ([out, words], _) => Ok((*out, words * 8)),
            _ => Err(Error::new(format!("`{}.qweight` has shape {:?}, expected 2 dimensions", module.plan.name, q.shape))),
        }
    }

    fn dequantize(&self, module: &ModuleTensors<'_>, config: &Config) -> Result<Vec<f32>> {
        Packed::read(module, config)?.dense()
    }

    fn forward(&self, module: &ModuleTensors<'_>, x: &[f32], rows: usize, config: &Config) -> Result<Vec<f32>> {
        let packed = Packed::read(module, config)?;
        let (out, inp) = (packed.out, packed.inp);
        if x.len() != rows * inp {
            return Err(Error::new(format!("`{}`: input has {} values, expected {rows} rows of {inp}", module.plan.name, x.len())));
        }
        let bias = module.find("bias").map(|b| b.to_f32());
        if rows > SMALL_BATCH || !packed.gemm {
            // Many rows amortise one dequantization; a matrix product then wins.
            return Ok(dense::linear_forward(x, rows, &packed.dense()?, (out, inp), bias.as_deref()));
        }
        let mut y = packed.forward_gemm(x, rows);
        if let Some(b) = bias {
            y.chunks_mut(out).for_each(|r| r.iter_mut().zip(&b).for_each(|(y, b)| *y += b));
        }
        Ok(y)
    }
}

/// Up to this many rows, `forward` runs on the packed words instead of dequantizing whole.
const SMALL_BATCH: usize = 8;

/// Output words handled by one task of the packed forward.
const WORDS_PER_TASK: usize = 16;

/// An AWQ module's packed tensors, checked against each other.
struct Packed<'a> {
    gemm: bool,
    out: usize,
    inp: usize,
    group_size: usize,
    qweight: std::borrow::Cow<'a, [i32]>,
    qzeros: std::borrow::Cow<'a, [i32]>,
    /// GEMM `[groups, out]`; GEMV `[out, zeros width * 8]`.
    scales: Vec<f32>,
    zeros_width: usize,
}

impl<'a> Packed<'a> {
    fn read(module: &ModuleTensors<'a>, config: &Config) -> Result<Self> {
        let name = &module.plan.name;
        let (qw, qz, sc) = (module.get("qweight")?, module.get("qzeros")?, module.get("scales")?);
        let bad = |what: String| Error::new(format!("AWQ module `{name}`: {what}"));
        let gemm = config.str("version") == "gemm";
        let (out, inp) = match *qw.shape {
            [a, b] if gemm => (b * 8, a),
            [a, b] => (a, b * 8),
            _ => return Err(bad(format!("qweight has shape {:?}", qw.shape))),
        };
        let g = config.int("group_size");
        let group_size = if g <= 0 { inp } else { g as usize };
        let groups = inp.div_ceil(group_size);
        let zeros_width = if gemm { out / 8 } else { packing::gemv_zeros_width(inp, group_size) };
        let (want_z, want_s) = if gemm {
            ([groups, out / 8], [groups, out])
        } else {
            ([out, zeros_width], [out, zeros_width * 8])
        };
        if qz.shape != want_z || sc.shape != want_s {
            return Err(bad(format!(
                "qzeros {:?} / scales {:?} do not match qweight {:?} with group_size {group_size} (expected {want_z:?} / {want_s:?})",
                qz.shape, sc.shape, qw.shape
            )));
        }
        Ok(Packed { gemm, out, inp, group_size, qweight: qw.cast()?, qzeros: qz.cast()?, scales: sc.to_f32(), zeros_width })
    }

    /// The dense `[out, inp]` weight.
    fn dense(&self) -> Result<Vec<f32>> {
        let (out, inp, gs) = (self.out, self.inp, self.group_size);
        let mut w = vec![0f32; out * inp];
        if self.gemm {
            // Decode input row by input row ([in, out] order), then transpose.
            let rows: Vec<Vec<f32>> = (0..inp)
                .into_par_iter()
                .map(|i| {
                    let g = i / gs;
                    let mut row = vec![0f32; out];
                    for c in 0..out / 8 {
                        let q = packing::unpack_gemm_word(self.qweight[i * out / 8 + c]);
                        let z = packing::unpack_gemm_word(self.qzeros[g * out / 8 + c]);
                        for j in 0..8 {
                            row[8 * c + j] = (q[j] as f32 - z[j] as f32) * self.scales[g * out + 8 * c + j];
                        }
                    }
                    row
                })
                .collect();
            w.par_chunks_mut(inp).enumerate().for_each(|(o, dst)| {
                for (i, v) in dst.iter_mut().enumerate() {
                    *v = rows[i][o];
                }
            });
        } else {
            let zw = self.zeros_width;
            w.par_chunks_mut(inp).enumerate().for_each(|(o, dst)| {
                for c in 0..inp / 8 {
                    let q = packing::unpack_gemv_word(self.qweight[o * inp / 8 + c]);
                    for j in 0..8 {
                        let i = 8 * c + j;
                        let g = i / gs;
                        let z = packing::unpack_gemv_word(self.qzeros[o * zw + g / 8])[g % 8];
                        dst[i] = (q[j] as f32 - z as f32) * self.scales[o * zw * 8 + g];
                    }
                }
            });
        }
        Ok(w)
    }

    /// `x W^T` on the GEMM words: per group, `scale * (sum_i x_i q_i - zero * sum_i x_i)`.
    fn forward_gemm(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (out, inp, gs) = (self.out, self.inp, self.group_size);
        let words = out / 8;
        let parts: Vec<(usize, usize, Vec<f32>)> = (0..words.div_ceil(WORDS_PER_TASK))
            .into_par_iter()
            .map(|b| {
                let (c0, c1) = (b * WORDS_PER_TASK, ((b + 1) * WORDS_PER_TASK).min(words));
                let n = (c1 - c0) * 8;
                let mut y = vec![0f32; rows * n];
                let mut acc = vec![0f32; rows * n];
                let mut xs = vec![0f32; rows];
                for g in 0..inp.div_ceil(gs) {
                    acc.fill(0.0);
                    xs.fill(0.0);
                    for i in g * gs..((g + 1) * gs).min(inp) {
                        for c in c0..c1 {
                            let q = packing::unpack_gemm_word(self.qweight[i * words + c]);
                            for t in 0..rows {
                                let xv = x[t * inp + i];
                                let a = &mut acc[t * n + (c - c0) * 8..t * n + (c - c0) * 8 + 8];
                                a.iter_mut().zip(q).for_each(|(a, q)| *a += xv * q as f32);
                            }
                        }
                        for t in 0..rows {
                            xs[t] += x[t * inp + i];
                        }
                    }
                    for c in c0..c1 {
                        let z = packing::unpack_gemm_word(self.qzeros[g * words + c]);
                        for j in 0..8 {
                            let (o, k) = (8 * c + j, (c - c0) * 8 + j);
                            let s = self.scales[g * out + o];
                            for t in 0..rows {
                                y[t * n + k] += s * (acc[t * n + k] - z[j] as f32 * xs[t]);
                            }
                        }
                    }
                }
                (c0 * 8, n, y)
            })
            .collect();
        let mut y = vec![0f32; rows * out];
        for (o0, n, part) in parts {
            for t in 0..rows {
                y[t * out + o0..t * out + o0 + n].copy_from_slice(&part[t * n..(t + 1) * n]);
            }
        }
        y
    }
}

export_plugin!(Awq);
