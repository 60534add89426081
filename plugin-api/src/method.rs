//! The trait a method author implements, and the values that flow through its hooks.
//!
//! The hooks follow Hugging Face's `HfQuantizer` lifecycle, in the order the host calls them:
//!
//! 1. [`QuantMethod::info`]: identity, flags, requirements, options (read once at load).
//! 2. [`QuantMethod::check_config`]: cross-key rules on the user's settings.
//! 3. [`QuantMethod::validate_environment`]: after the host checked `required_packages`.
//! 4. [`QuantMethod::update_dtype`]: the dtype for tensors the method leaves dense.
//! 5. [`QuantMethod::process_model_before_weight_loading`]: from the model skeleton to a [`Plan`].
//! 6. Calibration methods only: [`QuantMethod::new_observer`], fed by the host.
//! 7. [`QuantMethod::quantize`], once per planned module, as its weights stream in; or, for
//!    plans with [`Plan::fold_input_scales`], [`QuantMethod::quantize_group`] once per group of
//!    Linears that share an input.
//! 8. [`QuantMethod::process_model_after_weight_loading`]: the `quantization_config`.
//!
//! Reading back: [`QuantMethod::linear_shape`], [`QuantMethod::dequantize`], [`QuantMethod::forward`].

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{Config, ConfigProblem, OptionSpec};
use crate::tensor::{DType, Tensor, TensorSpec, TensorView};
use crate::Error;

/// Result type of every hook.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a method declares about itself, mirroring `HfQuantizer`'s class attributes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MethodInfo {
    /// What `kvant quantize --method` takes, e.g. `rtn` or `bnb-nf4`. Lowercase, no spaces.
    pub name: String,
    /// The method's own version; part of the resume fingerprint.
    pub version: String,
    /// One line for `kvant list`.
    pub description: String,
    /// Checkpoints this method reads: each entry lists `quantization_config` keys and the values
    /// they must all have, e.g. `{"quant_method": "bitsandbytes", "load_in_4bit": true}`.
    pub answers_to: Vec<Map<String, Value>>,
    /// Declared capabilities.
    pub flags: Flags,
    /// Requirements the host checks before anything else, all reported at once:
    /// `cpu:<feature>` (`cpu:avx2`), `lib:<soname>` (a shared library that must load),
    /// `host:>=X.Y` (minimum contract version), `calibration` (calibration data must be given).
    pub required_packages: Vec<String>,
    /// The options this method accepts, with defaults.
    pub options: Vec<OptionSpec>,
    /// Largest relative Frobenius error of `dequantize(quantize(W))` against `W` that
    /// `kvant plugin check` accepts on Gaussian random weights with the default options.
    pub tolerance: f32,
    /// Largest relative Frobenius difference between `forward` and dequantize + dense matrix
    /// product that `kvant plugin check` accepts, on Gaussian inputs (contract 1.2; absent:
    /// [`DEFAULT_FORWARD_TOLERANCE`], summation order only). A forward that does more than
    /// reorder the sums, such as LLM.int8's, which also rounds the inputs to int8, declares what
    /// that costs, and says why in a comment.
    #[serde(default = "default_forward_tolerance")]
    pub forward_tolerance: f32,
    /// The method only reads checkpoints quantized elsewhere (GGUF): planning refuses every
    /// module with a message, `is_serializable` is false, and `kvant plugin check` checks that
    /// refusal instead of a round trip (contract 1.2; absent: false).
    #[serde(default)]
    pub read_only: bool,
    /// Files written beside `config.json` with the same `quantization_config` dictionary, for
    /// the tools that read it from there, e.g. GPTQ's `quantize_config.json` (GPTQModel,
    /// AutoGPTQ). Plain file names (contract 1.2; absent: none).
    #[serde(default)]
    pub config_files: Vec<String>,
}

/// The `forward` tolerance of methods that declare none: float sums in another order.
pub const DEFAULT_FORWARD_TOLERANCE: f32 = 1e-3;

fn default_forward_tolerance() -> f32 {
    DEFAULT_FORWARD_TOLERANCE
}

/// The flags `HfQuantizer` subclasses declare.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flags {
    /// Needs calibration data: quantize runs after the host fed the module's observer.
    pub requires_calibration: bool,
    /// Quantizes each raw parameter as it is read (on the fly), like bitsandbytes.
    pub requires_parameters_quantization: bool,
    /// Its quantized weights can be saved and loaded back.
    pub is_serializable: bool,
    /// Models can be fine-tuned on top of its quantized weights.
    pub is_trainable: bool,
}

/// The machine and run the method is asked to work in.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    /// The host's version, e.g. `0.1.0`.
    pub host_version: String,
    /// The contract version the host speaks, e.g. `1.0`.
    pub contract_version: String,
    /// CPU features present at run time (`avx2`, `avx512f`, `avx512bf16`, `fma`...).
    pub cpu_features: Vec<String>,
    /// Threads the plugin may use (its pool is already sized to this).
    pub threads: usize,
    /// Memory available, in bytes.
    pub memory_available: u64,
    /// True when the checkpoint already carries this method's quantized weights.
    pub pre_quantized: bool,
    /// The dtype the user asked for, if any.
    pub requested_dtype: Option<DType>,
    /// True when calibration data was supplied.
    pub calibration: bool,
}

/// What a module of the model is, decided by the host from the architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleKind {
    /// A linear layer `y = x W^T + b`: the only kind methods convert.
    Linear,
    /// A token or position embedding.
    Embedding,
    /// A normalisation layer.
    Norm,
    /// The output head (also a Linear, never converted unless the user insists).
    Head,
    /// Anything else.
    Other,
}

/// One module of the skeleton: its tensors' specs, no data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Module {
    /// Full name, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// What the host decided it is.
    pub kind: ModuleKind,
    /// Its tensors, names relative to the module (`weight`, `bias`).
    pub tensors: Vec<TensorSpec>,
    /// Why the host keeps it dense (`modules_to_not_convert`, output head...); `None` if it may convert.
    pub not_converted: Option<String>,
}

impl Module {
    /// The Linear's `(out_features, in_features)`, from its `weight`.
    pub fn linear_shape(&self) -> Option<(usize, usize)> {
        let w = self.tensors.iter().find(|t| t.name == "weight")?;
        match w.shape[..] {
            [out, inp] => Some((out, inp)),
            _ => None,
        }
    }

    /// True if the module has a `bias` tensor.
    pub fn has_bias(&self) -> bool {
        self.tensors.iter().any(|t| t.name == "bias")
    }

    /// The dtype of its `weight`.
    pub fn weight_dtype(&self) -> Option<DType> {
        self.tensors.iter().find(|t| t.name == "weight").map(|t| t.dtype)
    }

    /// True for a Linear the host allows converting.
    pub fn is_convertible_linear(&self) -> bool {
        self.kind == ModuleKind::Linear && self.not_converted.is_none() && self.linear_shape().is_some()
    }
}

/// The model "on meta": architecture and every module, without weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Skeleton {
    /// `config.json`'s `model_type` (`llama`, `qwen2`...).
    pub model_type: String,
    /// The whole `config.json`.
    pub config: Value,
    /// Every module, in checkpoint order.
    pub modules: Vec<Module>,
}

/// What a method will do to one module: the exact tensors it will write.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModulePlan {
    /// Full module name.
    pub name: String,
    /// `(out_features, in_features)` of the dense Linear.
    pub shape: (usize, usize),
    /// Every tensor `quantize` returns for it, names relative to the module.
    pub tensors: Vec<TensorSpec>,
    /// Method-specific facts the host passes back on every later call for this module.
    #[serde(default)]
    pub attrs: Value,
}

/// The result of `process_model_before_weight_loading`: modules to convert. Others stay dense.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Modules to convert, in any order.
    pub modules: Vec<ModulePlan>,
    /// Set by methods that search input scales (AWQ); calibration methods only (contract 1.1).
    ///
    /// The host then observes each decoder block once, in full precision, and hands every group
    /// of planned Linears that share an input to [`QuantMethod::quantize_group`]: (q, k, v)
    /// behind `input_layernorm`, (gate, up) behind `post_attention_layernorm`, o behind
    /// `v_proj`'s output rows, down behind `up_proj`'s output rows. Groups run in reverse
    /// order (down, o, gate/up, q/k/v), so each group's producer is folded before it is itself
    /// quantized, and nothing in the block is quantized before every scale of the block is
    /// known. The host divides the producer's output by the returned
    /// [`Quantized::input_scale`] (it owns the model graph); the method must have multiplied
    /// the members' input columns by it. A group without a foldable producer (o behind a
    /// grouped-query `v_proj`, whose rows are shared by several heads) goes through
    /// [`QuantMethod::quantize`] instead, member by member, and must come back unscaled.
    /// The next block sees the full-precision block's output, as AutoAWQ does.
    #[serde(default)]
    pub fold_input_scales: bool,
}

/// A module's tensors as handed to `quantize`, `dequantize` and `forward`.
#[derive(Clone, Copy, Debug)]
pub struct ModuleTensors<'a> {
    /// The module's plan (for pre-quantized input, rebuilt by the host from `linear_shape`).
    pub plan: &'a ModulePlan,
    /// The tensors, names relative to the module.
    pub tensors: &'a [TensorView<'a>],
}

impl<'a> ModuleTensors<'a> {
    /// The tensor named `name`, or an error that names the module and what it has instead.
    pub fn get(&self, name: &str) -> Result<TensorView<'a>> {
        self.find(name).ok_or_else(|| {
            let have: Vec<&str> = self.tensors.iter().map(|t| t.name).collect();
            Error::new(format!(
                "module `{}` has no tensor `{name}` (it has: {})",
                self.plan.name,
                have.join(", ")
            ))
        })
    }

    /// The tensor named `name`, if present.
    pub fn find(&self, name: &str) -> Option<TensorView<'a>> {
        self.tensors.iter().find(|t| t.name == name).copied()
    }
}

/// What `quantize` returns for one module.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Quantized {
    /// Exactly the tensors the plan announced for this module.
    pub tensors: Vec<Tensor>,
    /// The method's own reconstruction loss (e.g. GPTQ's), shown in the progress log.
    pub loss: Option<f64>,
    /// Per-input-channel factors the host must fold into the op producing this module's input
    /// (AWQ): the producer's output is multiplied by `1 / input_scale`. Only honoured from
    /// [`QuantMethod::quantize_group`] under [`Plan::fold_input_scales`], where every member of
    /// a group must return the same factors (the host errors otherwise).
    pub input_scale: Option<Vec<f32>>,
}

impl Quantized {
    /// Just tensors.
    pub fn tensors(tensors: Vec<Tensor>) -> Self {
        Quantized { tensors, ..Default::default() }
    }
}

/// What the host tells `process_model_after_weight_loading` about the finished run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Modules that were converted.
    pub converted: Vec<String>,
    /// Linear modules left dense (output head, `modules_to_not_convert`, skipped ones).
    pub not_converted: Vec<String>,
    /// Dtype of the tensors left dense.
    pub dtype: Option<DType>,
}

/// State a calibration method accumulates for one module from its input activations.
pub trait Observer: Send + 'static {
    /// Takes one batch of the module's inputs: `rows` rows of `in_features` values, row-major.
    fn observe(&mut self, x: &[f32], rows: usize) -> Result<()>;
}

/// The observer of methods that need no calibration.
pub enum NoCalibration {}

impl Observer for NoCalibration {
    fn observe(&mut self, _: &[f32], _: usize) -> Result<()> {
        match *self {}
    }
}

/// A quantization method. Implement this, then export it with [`crate::export_plugin!`].
///
/// Only [`info`](Self::info), [`plan_linear`](Self::plan_linear), [`quantize`](Self::quantize),
/// [`linear_shape`](Self::linear_shape) and [`dequantize`](Self::dequantize) are required; the
/// rest have defaults that match `HfQuantizer`'s. Hooks run on the host's thread budget:
/// use rayon freely, the plugin's pool is already sized. Use `log` macros freely: records reach
/// the host's logger. A panic becomes an error for the host, never a crash.
pub trait QuantMethod: Send + Sync + 'static {
    /// Per-module calibration state; [`NoCalibration`] for methods that take none.
    type Observer: Observer;

    /// Identity, flags, requirements and options.
    fn info(&self) -> MethodInfo;

    /// Rules that involve several options (single-option checks are done from the
    /// [`OptionSpec`]s). Return every problem found.
    fn check_config(&self, _config: &Config) -> Vec<ConfigProblem> {
        Vec::new()
    }

    /// Turns a checkpoint's `quantization_config` into this method's options, for reading
    /// pre-quantized checkpoints. The default keeps the keys the method publishes.
    fn config_from_checkpoint(&self, quantization_config: &Map<String, Value>) -> Result<Map<String, Value>> {
        let info = self.info();
        Ok(quantization_config
            .iter()
            .filter(|(k, _)| info.options.iter().any(|o| &o.key == *k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    /// Last checks before work starts (the host has already checked `required_packages`).
    fn validate_environment(&self, _env: &Environment, _config: &Config) -> Result<()> {
        Ok(())
    }

    /// The dtype for tensors left dense, given the user's request (none: keep the checkpoint's).
    fn update_dtype(&self, requested: Option<DType>, _config: &Config) -> Option<DType> {
        requested
    }

    /// Decides, for the whole skeleton, which modules convert. The default asks
    /// [`plan_linear`](Self::plan_linear) for every Linear the host allows converting.
    fn process_model_before_weight_loading(&self, skeleton: &Skeleton, config: &Config) -> Result<Plan> {
        let mut plan = Plan::default();
        for module in skeleton.modules.iter().filter(|m| m.is_convertible_linear()) {
            if let Some(p) = self.plan_linear(module, config)? {
                plan.modules.push(p);
            }
        }
        Ok(plan)
    }

    /// The tensors this method writes for one Linear, or `None` to keep it dense.
    fn plan_linear(&self, module: &Module, config: &Config) -> Result<Option<ModulePlan>>;

    /// Starts calibration state for one planned module (calibration methods only).
    ///
    /// Linears that read the same input (q/k/v, gate/up) share one observer: the host creates
    /// it for the group's first planned member, feeds it the input once, and passes it to
    /// `quantize` of every member. An observer's state must therefore depend on the input only.
    fn new_observer(&self, module: &ModulePlan, _config: &Config) -> Result<Self::Observer> {
        Err(Error::new(format!("module `{}`: this method takes no calibration", module.name)))
    }

    /// Quantizes one module. `weights` holds its dense `weight` (F32, F16 or BF16, shape
    /// `[out, in]`) and `bias` if it has one; `observer` is its calibration state, if any.
    /// Returns exactly the tensors in `weights.plan.tensors`.
    fn quantize(&self, weights: &ModuleTensors<'_>, observer: Option<&Self::Observer>, config: &Config)
        -> Result<Quantized>;

    /// Quantizes a group of modules that read the same input (q/k/v, gate/up, or one Linear
    /// behind a foldable producer). Calibration quantizes every group through this, so a
    /// method can share work between members (GPTQ factors their Hessian once) or run them side
    /// by side. `members` are in execution order; `observers[i]` is member `i`'s calibration
    /// state, and members that share an input may be given the same observer. Returns one
    /// [`Quantized`] per member, in order; only for plans with [`Plan::fold_input_scales`] may
    /// each carry the group's `input_scale`, when the method scaled the inputs.
    ///
    /// The default calls [`quantize`](Self::quantize) for each member and returns no scale.
    fn quantize_group(
        &self,
        members: &[ModuleTensors<'_>],
        observers: &[Option<&Self::Observer>],
        config: &Config,
    ) -> Result<Vec<Quantized>> {
        if members.len() != observers.len() {
            return Err(Error::new(format!("{} group members but {} observers", members.len(), observers.len())));
        }
        members.iter().zip(observers).map(|(m, o)| self.quantize(m, *o, config)).collect()
    }

    /// The `quantization_config` for `config.json`.
    fn process_model_after_weight_loading(&self, _summary: &Summary, config: &Config) -> Result<Map<String, Value>> {
        let info = self.info();
        let mut qc = Map::new();
        let method = info.answers_to.first().and_then(|m| m.get("quant_method")).cloned();
        qc.insert("quant_method".into(), method.unwrap_or_else(|| info.name.clone().into()));
        qc.extend(config.values().clone());
        Ok(qc)
    }

    /// For a pre-quantized module (its packed tensors, `plan.tensors` empty and `plan.shape`
    /// unknown): the dense `(out_features, in_features)`.
    fn linear_shape(&self, module: &ModuleTensors<'_>, config: &Config) -> Result<(usize, usize)>;

    /// The dense weight, `[out, in]` row-major F32. The host takes `bias` as stored.
    fn dequantize(&self, module: &ModuleTensors<'_>, config: &Config) -> Result<Vec<f32>>;

    /// `y = x W^T + b` for `rows` rows of `x`, computed on the packed form. The default
    /// dequantizes and multiplies; override it with a kernel that reads the packed weights.
    fn forward(&self, module: &ModuleTensors<'_>, x: &[f32], rows: usize, config: &Config) -> Result<Vec<f32>> {
        let w = self.dequantize(module, config)?;
        let bias = module.find("bias").map(|b| b.to_f32());
        Ok(crate::dense::linear_forward(x, rows, &w, module.plan.shape, bias.as_deref()))
    }
}
