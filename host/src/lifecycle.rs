//! The quantization lifecycle, top to bottom, in the order of Hugging Face's `HfQuantizer`:
//! pick the method, check requirements and environment, settle the dtype, build the skeleton
//! from headers, plan, stream weights through `quantize`, check every returned tensor against the
//! plan, finish the `quantization_config`, and save atomically.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use kvant_plugin_api::dense::relative_error;
use kvant_plugin_api::ffi::MethodClient;
use kvant_plugin_api::tensor::from_f32;
use kvant_plugin_api::{Config, DType, Environment, ModulePlan, Plan, Quantized, Summary, Tensor, TensorSpec, TensorView};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::arch::{self, ModulePattern};
use crate::calibration::{activation_bytes, calibration_tokens, quantize_calibrated, CalibrationSpec};
use crate::checkpoint::{split_module_name, Checkpoint, CheckpointWriter, WriterOptions};
use crate::progress::Bar;
use crate::resume::{self, Journal};
use crate::watchdog;
use crate::model::{DeferredLinear, LinearOp, LlamaConfig, LlamaModel};
use crate::registry::{Method, Registry};
use crate::requirements;

/// What the user asked `kvant quantize` for.
#[derive(Clone, Debug, Default)]
pub struct QuantizeRequest {
    /// Input checkpoint folder.
    pub model: PathBuf,
    /// `--method`; may be omitted for pre-quantized input.
    pub method: Option<String>,
    /// Options from `--config` and `--set`, before validation.
    pub options: Map<String, Value>,
    /// Output folder.
    pub out: PathBuf,
    /// Replace an existing output.
    pub force: bool,
    /// Extra `modules_to_not_convert` patterns.
    pub not_convert: Vec<String>,
    /// Dtype requested for tensors left dense.
    pub dtype: Option<DType>,
    /// Threads lent to the plugin.
    pub threads: usize,
    /// Shard size limit of the output.
    pub max_shard_bytes: u64,
    /// Draw progress bars.
    pub progress: bool,
    /// Calibration data, for methods that need it.
    pub calibration: Option<CalibrationSpec>,
    /// Continue the interrupted run of the same output when nothing it depends on changed.
    pub resume: bool,
    /// Stop the run when one `quantize` call takes longer (streaming methods; see watchdog.rs).
    pub module_timeout: Option<std::time::Duration>,
    /// Keep a module dense when `quantize` fails on it, instead of stopping (see watchdog.rs).
    pub skip_failed_modules: bool,
}

const GIB: f64 = (1u64 << 30) as f64;

/// Reconstruction error of one converted module.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ModuleReport {
    /// Module name.
    pub name: String,
    /// `||dequantize(quantize(W)) - W|| / ||W||`.
    pub relative_error: f64,
    /// The method's own loss, if it reports one.
    pub loss: Option<f64>,
}

/// The closing summary of a quantization.
#[derive(Clone, Debug, Serialize)]
pub struct QuantizeReport {
    /// Method used.
    pub method: String,
    /// Validated options.
    pub config: Map<String, Value>,
    /// Output folder.
    pub out: PathBuf,
    /// Tensor bytes of the input.
    pub bytes_in: u64,
    /// Tensor bytes of the output.
    pub bytes_out: u64,
    /// Weights in converted modules.
    pub quantized_weights: u64,
    /// Bits per weight of the converted modules (packed codes, scales, zeros; not biases).
    pub bits_per_weight: f64,
    /// Bits per parameter over the whole model.
    pub bits_per_parameter: f64,
    /// Modules converted, with their errors.
    pub modules: Vec<ModuleReport>,
    /// Linear modules left dense, with the reason.
    pub not_converted: Vec<(String, String)>,
    /// Wall time.
    pub seconds: f64,
}

impl QuantizeReport {
    /// Mean relative error over converted modules.
    pub fn mean_error(&self) -> f64 {
        self.modules.iter().map(|m| m.relative_error).sum::<f64>() / self.modules.len().max(1) as f64
    }

    /// The module with the largest relative error.
    pub fn worst(&self) -> Option<&ModuleReport> {
        self.modules.iter().max_by(|a, b| a.relative_error.total_cmp(&b.relative_error))
    }
}

/// The environment this host offers a method.
pub fn environment(threads: usize, pre_quantized: bool, requested_dtype: Option<DType>, calibration: bool) -> Environment {
    Environment {
        host_version: env!("CARGO_PKG_VERSION").into(),
        contract_version: kvant_plugin_api::CONTRACT_VERSION.into(),
        cpu_features: requirements::cpu_features(),
        threads,
        memory_available: available_memory(),
        pre_quantized,
        requested_dtype,
        calibration,
    }
}

/// `MemAvailable` from /proc/meminfo, or 0 where unknown.
pub fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Validates user options, reporting every problem with its key.
pub fn validate_options(method: &MethodClient, options: &Map<String, Value>) -> Result<Config> {
    method.validate_config(options).map_err(|problems| {
        let lines: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
        anyhow!("invalid options for method `{}`:\n{}", method.info().name, lines.join("\n"))
    })
}

/// The method and options a checkpoint was quantized with, if it was.
pub fn checkpoint_method<'r>(registry: &'r Registry, checkpoint: &Checkpoint) -> Result<Option<(&'r Method, Config)>> {
    let Some(qc) = checkpoint.quantization_config() else { return Ok(None) };
    let qc = qc.as_object().ok_or_else(|| {
        anyhow!("{}: `quantization_config` in config.json is not an object", checkpoint.model_dir().display())
    })?;
    let Some(method) = registry.for_checkpoint(qc) else {
        let name = qc.get("quant_method").map_or("(none)".into(), |v| v.to_string());
        bail!(
            "{} is quantized with quant_method {name}, which no loaded plugin reads; see `kvant list`",
            checkpoint.model_dir().display()
        )
    };
    let options = method.client.config_from_checkpoint(qc).map_err(|e| anyhow!("{e}"))?;
    let config = validate_options(&method.client, &options)
        .with_context(|| format!("reading the quantization_config of {}", checkpoint.model_dir().display()))?;
    Ok(Some((method, config)))
}

fn check_tensor(module: &str, expected: &TensorSpec, got: &TensorView<'_>) -> Result<()> {
    if !expected.admits(got.dtype, got.shape) {
        let bound = if expected.variable_length { " (1-D, at most)" } else { "" };
        bail!(
            "tensor `{module}.{}` is {} {:?}, but the plan announced {} {:?}{bound}",
            got.name, got.dtype, got.shape, expected.dtype, expected.shape
        );
    }
    let len = got.numel() * got.dtype.size();
    if got.data.len() != len {
        bail!("tensor `{module}.{}` has {} bytes, expected {len}", got.name, got.data.len());
    }
    if got.dtype.is_float() && !all_finite(got) {
        bail!("tensor `{module}.{}` contains NaN or infinite values", got.name);
    }
    Ok(())
}

/// No NaN or infinity, read in place (F32 is most of what plugins return, and can be large).
fn all_finite(t: &TensorView<'_>) -> bool {
    match t.dtype {
        DType::F32 => t.cast::<f32>().is_ok_and(|v| v.iter().all(|x| x.is_finite())),
        _ => t.to_f32().iter().all(|x| x.is_finite()),
    }
}

/// Checks a plugin's result for one module against its plan: same names, dtypes, shapes; finite.
pub fn check_against_plan(plan: &ModulePlan, tensors: &[Tensor]) -> Result<()> {
    check_views_against_plan(plan, &tensors.iter().map(Tensor::view).collect::<Vec<_>>())
}

/// [`check_against_plan`] on tensors the plugin lends (see `MethodClient::quantize_lent`).
pub fn check_views_against_plan(plan: &ModulePlan, tensors: &[TensorView<'_>]) -> Result<()> {
    let got: HashSet<&str> = tensors.iter().map(|t| t.name).collect();
    let want: HashSet<&str> = plan.tensors.iter().map(|t| t.name.as_str()).collect();
    if got.len() != tensors.len() {
        bail!("module `{}`: the plugin returned a tensor name twice", plan.name);
    }
    if got != want {
        let mut extra: Vec<_> = got.difference(&want).collect();
        let mut missing: Vec<_> = want.difference(&got).collect();
        extra.sort();
        missing.sort();
        bail!("module `{}`: the plugin returned tensors that differ from its plan (missing {missing:?}, unexpected {extra:?})", plan.name);
    }
    for t in tensors {
        let spec = plan.tensors.iter().find(|s| s.name == t.name).expect("names checked above");
        check_tensor(&plan.name, spec, t)?;
    }
    Ok(())
}

fn check_plan(plan: &Plan, skeleton: &kvant_plugin_api::Skeleton) -> Result<()> {
    let mut seen = HashSet::new();
    for m in &plan.modules {
        let module = skeleton
            .modules
            .iter()
            .find(|s| s.name == m.name)
            .ok_or_else(|| anyhow!("the plan converts `{}`, which the model does not have", m.name))?;
        if !module.is_convertible_linear() {
            bail!(
                "the plan converts `{}`, which must stay dense ({})",
                m.name,
                module.not_converted.as_deref().unwrap_or("not a Linear")
            );
        }
        if module.linear_shape() != Some(m.shape) {
            bail!("the plan gives `{}` shape {:?}, the checkpoint has {:?}", m.name, m.shape, module.linear_shape());
        }
        if !seen.insert(&m.name) {
            bail!("the plan converts `{}` twice", m.name);
        }
        let mut names = HashSet::new();
        for t in &m.tensors {
            if !names.insert(&t.name) || t.name.is_empty() {
                bail!("the plan for `{}` names tensor `{}` twice or empty", m.name, t.name);
            }
            if t.variable_length && t.shape.len() != 1 {
                bail!("the plan gives `{}.{}` a variable length but shape {:?}; only 1-D tensors may have one", m.name, t.name, t.shape);
            }
        }
    }
    Ok(())
}

/// The tensors of one module, named relative to it (`weight`, `bias`), as views into the checkpoint.
pub fn module_views<'c>(checkpoint: &'c Checkpoint, module: &str) -> Result<Vec<TensorView<'c>>> {
    checkpoint
        .tensors_with_prefix(module)
        .into_iter()
        .filter(|n| split_module_name(n).0 == module)
        .map(|n| checkpoint.view(n).map(|v| TensorView { name: split_module_name(n).1, ..v }))
        .collect()
}

fn convert_dense(view: &TensorView<'_>, dtype: Option<DType>) -> Option<Vec<u8>> {
    match dtype {
        Some(d) if view.dtype.is_float() && view.dtype != d => Some(from_f32(d, &view.to_f32())),
        _ => None,
    }
}

/// Runs the whole lifecycle and writes the quantized checkpoint.
pub fn quantize(registry: &Registry, req: &QuantizeRequest) -> Result<QuantizeReport> {
    watchdog::skipping_failed_modules(req, |req| quantize_once(registry, req))
}

fn quantize_once(registry: &Registry, req: &QuantizeRequest) -> Result<QuantizeReport> {
    let started = Instant::now();
    // Shared with the calibration model's deferred Linears, which read their weights from it.
    let checkpoint = Arc::new(Checkpoint::open(&req.model)?);

    // 1. The method: the checkpoint's own wins over --method.
    if let Some((method, _)) = checkpoint_method(registry, &checkpoint)? {
        bail!(
            "{} is already quantized (method `{}`); run `kvant dequantize` first to re-quantize it",
            req.model.display(),
            method.client.info().name
        );
    }
    let name = req.method.as_deref().ok_or_else(|| anyhow!("no --method given; `kvant list` shows the methods"))?;
    let method = &registry.get(name)?.client;
    let info = method.info().clone();

    // 2. Options, then requirements (all at once), then the method's own environment check.
    let config = validate_options(method, &req.options)?;
    if !info.flags.is_serializable {
        bail!("method `{name}` cannot save its quantized weights (is_serializable = false), so it cannot write {}", req.out.display());
    }
    let env = environment(req.threads, false, req.dtype, req.calibration.is_some());
    let unmet = requirements::unmet(&info.required_packages, &env);
    if !unmet.is_empty() {
        bail!("method `{name}` cannot run here:\n  {}", unmet.join("\n  "));
    }
    method.validate_environment(&env, &config).map_err(|e| anyhow!("method `{name}`: {e}"))?;

    // 3. Dtype of what stays dense.
    let dtype = method.update_dtype(req.dtype, &config).map_err(|e| anyhow!("method `{name}`: {e}"))?;

    // 4-5. Skeleton from headers, then the plan.
    let patterns = req.not_convert.iter().map(|p| ModulePattern::parse(p)).collect::<Result<Vec<_>>>()?;
    let skeleton = arch::skeleton(&checkpoint, &patterns);
    let plan = method.plan(&skeleton, &config).map_err(|e| anyhow!("method `{name}`: {e}"))?;
    check_plan(&plan, &skeleton).with_context(|| format!("method `{name}` made an invalid plan"))?;
    let planned: HashMap<&str, &ModulePlan> = plan.modules.iter().map(|m| (m.name.as_str(), m)).collect();

    // The output layout: planned modules' tensors replace their weight and bias.
    let mut specs = Vec::new();
    let mut emitted = HashSet::new();
    for tensor in checkpoint.tensor_names() {
        let (module, _) = split_module_name(tensor);
        match planned.get(module) {
            Some(p) if emitted.insert(module) => {
                specs.extend(p.tensors.iter().map(|t| TensorSpec { name: format!("{module}.{}", t.name), ..t.clone() }))
            }
            Some(_) => {}
            None => {
                let s = checkpoint.spec(tensor).expect("listed");
                let d = if s.dtype.is_float() { dtype.unwrap_or(s.dtype) } else { s.dtype };
                specs.push(TensorSpec::new(tensor, d, s.shape.clone()));
            }
        }
    }
    let options = WriterOptions {
        max_shard_bytes: req.max_shard_bytes,
        force: req.force,
        protected_paths: vec![req.model.clone()],
        ..Default::default()
    };
    // Resume hook: the journal decides what an interrupted run already wrote (resume.rs).
    let mut journal = Journal::open(&req.out, req.force, &fingerprint(registry, req, &config, &checkpoint)?, req.resume)?;
    let options = WriterOptions { resumable: Some(journal.resumable()), fail_after_bytes: resume::injected_write_failure(), ..options };
    let resumed: HashSet<String> = plan.modules.iter().filter(|m| journal.done(&m.name).is_some()).map(|m| m.name.clone()).collect();
    let writer = CheckpointWriter::create(&req.out, specs, options)?;

    // 6. Weights. Planned modules go through the method: streamed one by one as they are read,
    //    or block by block after calibration. Then what stays dense is copied (or cast), after,
    //    because calibration may fold input scales into some of it (AWQ).
    let mut reports = Vec::new();
    let mut quantized_weights = 0u64;
    let mut quantized_bytes = 0u64;
    // `dense` is what the packed tensors stand for: the checkpoint's weights, or their folded form.
    let mut record = |p: &ModulePlan, packed: &[TensorView<'_>], loss: Option<f64>, dense: &[TensorView<'_>]| -> Result<()> {
        if let Some(done) = journal.done(&p.name) {
            reports.push(serde_json::from_value(done.report.clone()).context("journal entry without a report")?);
            quantized_bytes += p
                .tensors
                .iter()
                .filter(|t| t.name != "bias")
                .map(|t| done.lengths.get(&format!("{}.{}", p.name, t.name)).copied().unwrap_or(t.byte_len() as u64))
                .sum::<u64>();
            quantized_weights += (p.shape.0 * p.shape.1) as u64;
            return Ok(());
        }
        let error = reconstruction_error(method, p, packed, dense, &config)?;
        let mut lengths = std::collections::BTreeMap::new();
        for t in packed {
            let full = format!("{}.{}", p.name, t.name);
            writer.write(&full, t.data)?;
            if t.name != "bias" {
                quantized_bytes += t.data.len() as u64;
            }
            if let Some(len) = writer.settled_len(&full) {
                lengths.insert(full, len);
            }
        }
        // Streaming: the module's input pages leave resident memory with it.
        for v in dense {
            checkpoint.release(&format!("{}.{}", p.name, v.name));
        }
        quantized_weights += (p.shape.0 * p.shape.1) as u64;
        reports.push(ModuleReport { name: p.name.clone(), relative_error: error, loss });
        let tensors = packed.iter().map(|t| format!("{}.{}", p.name, t.name)).collect();
        let report = serde_json::to_value(reports.last())?;
        journal.record(resume::Done { module: p.name.clone(), tensors, report, lengths }, || writer.sync_data())
    };
    let bar = Bar::new(plan.modules.len() as u64, "quantize", req.progress);
    let mut folded: HashMap<String, Tensor> = HashMap::new();
    if info.flags.requires_calibration {
        let spec = req.calibration.as_ref().expect("the calibration requirement was checked");
        let tokenizer = req.model.join("tokenizer.json");
        if !tokenizer.is_file() {
            bail!("{}: calibration needs the model's tokenizer.json, which is missing", req.model.display());
        }
        let tokens = calibration_tokens(&tokenizer, spec)?;
        let llama = LlamaConfig::from_json(checkpoint.config())
            .with_context(|| format!("{}: calibration runs the model, and its config.json is not supported", req.model.display()))?;
        // Linears read their weights only if they run (see DeferredLinear): memory holds the
        // embedding, about one block and the activations, not the model.
        let mut model = LlamaModel::load(llama, checkpoint.as_ref(), &mut |name| {
            Ok(Some(Box::new(DeferredLinear::new(checkpoint.clone(), name)?) as Box<dyn LinearOp>))
        })?;
        let f32_bytes = |prefix: &str| {
            skeleton.modules.iter().filter(|m| m.name.starts_with(prefix)).flat_map(|m| &m.tensors).map(|t| t.numel() as u64 * 4).sum::<u64>()
        };
        let need = f32_bytes("model.embed_tokens") + 2 * f32_bytes("model.layers.0.") + activation_bytes(&model, spec.n_samples * spec.seq_len);
        let have = available_memory();
        log::info!("calibration holds about {:.1} GiB ({:.1} GiB available)", need as f64 / GIB, have as f64 / GIB);
        if have > 0 && need > have {
            bail!(
                "calibrating {} needs about {:.1} GiB but {:.1} GiB are available; lower --calibration-samples or \
                 --calibration-seq-len",
                req.model.display(),
                need as f64 / GIB,
                have as f64 / GIB
            );
        }
        let true_sequential = config.get("true_sequential").and_then(Value::as_bool).unwrap_or(true);
        let mut emit = |p: &ModulePlan, q: &Quantized, dense: &[TensorView<'_>]| {
            record(p, &q.tensors.iter().map(Tensor::view).collect::<Vec<_>>(), q.loss, dense)
        };
        folded = quantize_calibrated(&checkpoint, &mut model, method, &config, &plan, &tokens, spec, true_sequential, &bar, &mut emit)?
            .into_iter()
            .collect();
    } else {
        for module in skeleton.modules.iter() {
            let Some(p) = planned.get(module.name.as_str()) else { continue };
            bar.step(&p.name);
            if resumed.contains(&p.name) {
                record(p, &[], None, &[])?;
                continue;
            }
            let views = module_views(&checkpoint, &p.name)?;
            // The packed tensors stay in the plugin's memory until written: no copy.
            let q = watchdog::quantize(method, p, &views, &config, req.module_timeout)
                .and_then(|q| {
                    check_views_against_plan(p, &q.views()).map(|()| q).with_context(|| format!("method `{name}` returned bad tensors"))
                })
                .map_err(|e| watchdog::module_failure(&p.name, e))?;
            record(p, &q.views(), q.loss, &views)?;
        }
    }
    drop(bar);
    for module in skeleton.modules.iter().filter(|m| !planned.contains_key(m.name.as_str())) {
        if journal.done(&module.name).is_some() {
            continue;
        }
        let mut tensors = Vec::new();
        for view in module_views(&checkpoint, &module.name)? {
            let full = format!("{}.{}", module.name, view.name);
            let full = if module.name.is_empty() { view.name.to_string() } else { full };
            match (folded.get(&full), convert_dense(&view, dtype)) {
                (Some(t), _) => writer.write(&full, &from_f32(dtype.unwrap_or(view.dtype), &t.view().to_f32()))?,
                (None, Some(bytes)) => writer.write(&full, &bytes)?,
                (None, None) => writer.write_view_in_pieces(&full, &view, |piece| checkpoint.release_bytes(piece))?,
            }
            checkpoint.release(&full);
            tensors.push(full);
        }
        journal.record(resume::Done { module: module.name.clone(), tensors, report: Value::Null, lengths: Default::default() }, || writer.sync_data())?;
    }

    // 7. quantization_config, then the atomic save.
    let summary = Summary {
        converted: plan.modules.iter().map(|m| m.name.clone()).collect(),
        not_converted: skeleton
            .modules
            .iter()
            .filter(|m| matches!(m.kind, kvant_plugin_api::ModuleKind::Linear | kvant_plugin_api::ModuleKind::Head))
            .filter(|m| !planned.contains_key(m.name.as_str()))
            .map(|m| m.name.clone())
            .collect(),
        dtype,
    };
    let qc = method.finish(&summary, &config).map_err(|e| anyhow!("method `{name}`: {e}"))?;
    let mut out_config = checkpoint.config().clone();
    let obj = out_config
        .as_object_mut()
        .ok_or_else(|| anyhow!("{}: config.json is not a JSON object", req.model.display()))?;
    obj.insert("quantization_config".into(), Value::Object(qc));
    if let Some(d) = dtype {
        obj.insert("torch_dtype".into(), d.torch_name().into());
    }
    for file in &info.config_files {
        let text = serde_json::to_string_pretty(&obj["quantization_config"]).expect("a JSON value serializes");
        writer.write_file(file, format!("{text}\n").as_bytes()).with_context(|| format!("method `{name}`: config file `{file}`"))?;
    }
    let bytes_out = writer.data_bytes();
    writer.finish(&out_config, checkpoint.companion_files())?;

    let params: u64 = skeleton.modules.iter().flat_map(|m| &m.tensors).map(|t| t.numel() as u64).sum();
    Ok(QuantizeReport {
        method: name.to_string(),
        config: config.values().clone(),
        out: req.out.clone(),
        bytes_in: checkpoint.total_bytes(),
        bytes_out,
        quantized_weights,
        bits_per_weight: quantized_bytes as f64 * 8.0 / quantized_weights.max(1) as f64,
        bits_per_parameter: bytes_out as f64 * 8.0 / params.max(1) as f64,
        modules: reports,
        not_converted: skeleton
            .modules
            .iter()
            .filter(|m| matches!(m.kind, kvant_plugin_api::ModuleKind::Linear | kvant_plugin_api::ModuleKind::Head))
            .filter_map(|m| m.not_converted.clone().map(|r| (m.name.clone(), r)))
            .collect(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What the output of [`quantize`] depends on, for `--resume` (resume.rs).
fn fingerprint(registry: &Registry, req: &QuantizeRequest, config: &Config, checkpoint: &Checkpoint) -> Result<resume::Fingerprint> {
    let method = registry.get(req.method.as_deref().unwrap_or_default())?;
    let info = method.client.info();
    let library = method.origin.library();
    Ok(resume::Fingerprint::default()
        .with("kvant", env!("CARGO_PKG_VERSION"))
        .with("method", serde_json::json!({"name": info.name, "version": info.version}))
        .with("plugin library", serde_json::json!({"path": library, "sha256": resume::library_hash(library)?}))
        .with("options", config.values())
        .with("input files", resume::input_files(checkpoint)?)
        .with(
            "run settings",
            serde_json::json!({
                "dtype": req.dtype.map(|d| d.to_string()),
                "skip": req.not_convert,
                "max_shard_bytes": req.max_shard_bytes,
                "calibration": req.calibration.as_ref().map(|c| format!("{c:?}")),
            }),
        ))
}

fn reconstruction_error(
    method: &MethodClient,
    plan: &ModulePlan,
    views: &[TensorView<'_>],
    dense: &[TensorView<'_>],
    config: &Config,
) -> Result<f64> {
    let w = dense.iter().find(|v| v.name == "weight").ok_or_else(|| anyhow!("module `{}` has no weight", plan.name))?;
    // Read where the plugin left it: a copy would cost as much memory and time as the weight.
    method
        .dequantize_with(plan, views, config, |back| {
            if back.len() != plan.shape.0 * plan.shape.1 {
                bail!("method `{}` dequantized `{}` to {} values, expected {:?}", method.info().name, plan.name, back.len(), plan.shape);
            }
            Ok(relative_error(back, &w.as_f32()))
        })
        .map_err(|e| anyhow!("method `{}` cannot dequantize `{}` it just wrote: {e}", method.info().name, plan.name))?
}

/// A quantized module of a pre-quantized checkpoint, ready for `dequantize` and `forward`.
pub struct PackedModule<'c> {
    /// Its plan, rebuilt from the method's `linear_shape`.
    pub plan: ModulePlan,
    /// Its tensors, names relative to the module.
    pub tensors: Vec<TensorView<'c>>,
}

/// Finds the quantized modules of a pre-quantized checkpoint: modules with a tensor the dense
/// Linear would not have (anything but `weight`/`bias` in a float dtype).
pub fn packed_modules<'c>(checkpoint: &'c Checkpoint, method: &MethodClient, config: &Config) -> Result<Vec<PackedModule<'c>>> {
    let mut by_module: Vec<(String, Vec<TensorView<'c>>)> = Vec::new();
    for name in checkpoint.tensor_names() {
        let (module, local) = split_module_name(name);
        let view = TensorView { name: local, ..checkpoint.view(name)? };
        match by_module.iter_mut().find(|(m, _)| m == module) {
            Some((_, v)) => v.push(view),
            None => by_module.push((module.to_string(), vec![view])),
        }
    }
    let mut out = Vec::new();
    for (module, tensors) in by_module {
        let dense_like = tensors.iter().all(|t| (t.name == "weight" || t.name == "bias") && t.dtype.is_float());
        if dense_like {
            continue;
        }
        let mut plan = ModulePlan { name: module.clone(), shape: (0, 0), tensors: vec![], attrs: Value::Null };
        plan.shape = method
            .linear_shape(&plan, &tensors, config)
            .map_err(|e| anyhow!("{}: module `{module}`: {e}", checkpoint.model_dir().display()))?;
        plan.tensors = tensors.iter().map(TensorView::spec).collect();
        out.push(PackedModule { plan, tensors });
    }
    Ok(out)
}

/// Writes a dense copy of a pre-quantized checkpoint; returns the number of modules expanded.
pub fn dequantize(registry: &Registry, model: &Path, out: &Path, dtype: DType, force: bool, progress: bool) -> Result<usize> {
    let checkpoint = Checkpoint::open(model)?;
    let (method, config) = checkpoint_method(registry, &checkpoint)?
        .ok_or_else(|| anyhow!("{} has no quantization_config in config.json: it is not quantized", model.display()))?;
    let method = &method.client;
    let packed = packed_modules(&checkpoint, method, &config)?;
    let packed_names: HashSet<&str> = packed.iter().map(|p| p.plan.name.as_str()).collect();

    let mut specs = Vec::new();
    let mut placed = HashSet::new();
    for name in checkpoint.tensor_names() {
        let (module, _) = split_module_name(name);
        if let Some(p) = packed.iter().find(|p| p.plan.name == module) {
            if placed.insert(module) {
                specs.push(TensorSpec::new(format!("{module}.weight"), dtype, [p.plan.shape.0, p.plan.shape.1]));
                if let Some(b) = p.tensors.iter().find(|t| t.name == "bias") {
                    specs.push(TensorSpec::new(format!("{module}.bias"), dtype, b.shape.to_vec()));
                }
            }
        } else if !packed_names.contains(module) {
            let s = checkpoint.spec(name).expect("listed");
            specs.push(TensorSpec::new(name, if s.dtype.is_float() { dtype } else { s.dtype }, s.shape.clone()));
        }
    }
    let options = WriterOptions { force, protected_paths: vec![model.to_path_buf()], ..Default::default() };
    let writer = CheckpointWriter::create(out, specs.clone(), options)?;
    let bar = Bar::new(specs.len() as u64, "dequantize", progress);
    for p in &packed {
        bar.step(&p.plan.name);
        // Converted where the plugin left it: a copy would cost as much as the weight.
        let bytes = method
            .dequantize_with(&p.plan, &p.tensors, &config, |w| from_f32(dtype, w))
            .map_err(|e| anyhow!("method `{}` cannot dequantize `{}`: {e}", method.info().name, p.plan.name))?;
        writer.write(&format!("{}.weight", p.plan.name), &bytes)?;
        if let Some(b) = p.tensors.iter().find(|t| t.name == "bias") {
            writer.write(&format!("{}.bias", p.plan.name), &from_f32(dtype, &b.to_f32()))?;
        }
    }
    for name in checkpoint.tensor_names() {
        if packed_names.contains(split_module_name(name).0) {
            continue;
        }
        let view = checkpoint.view(name)?;
        match convert_dense(&view, Some(dtype)) {
            Some(bytes) => writer.write(name, &bytes)?,
            None => writer.write_view(name, &view)?,
        }
    }
    drop(bar);
    let mut config_json = checkpoint.config().clone();
    if let Some(obj) = config_json.as_object_mut() {
        obj.remove("quantization_config");
        obj.insert("torch_dtype".into(), dtype.torch_name().into());
    }
    writer.finish(&config_json, checkpoint.companion_files())?;
    Ok(packed.len())
}
