//! The wire between host and plugin. Plugin authors never touch this module: the
//! [`export_plugin!`](crate::export_plugin) macro and the host's loader use it.
//!
//! Everything crosses as `abi_stable` types: tensors as borrowed byte slices, and every
//! structured value ([`Skeleton`], [`Plan`], [`Config`] ...) as JSON text, so adding an optional
//! field to one of them never changes the binary layout. The root module and the host
//! callbacks are prefix types: a minor contract release may append fields to them.

// abi_stable's `sabi_trait` expansion defines impls inside a const block.
#![allow(non_local_definitions)]

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use abi_stable::library::RootModule;
use abi_stable::prefix_type::{PrefixTypeTrait, WithMetadata};
use abi_stable::sabi_trait;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec};
use abi_stable::StableAbi;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::config::{Config, ConfigProblem};
use crate::method::{
    Environment, MethodInfo, ModulePlan, ModuleTensors, Observer, Plan, QuantMethod, Quantized, Skeleton, Summary,
};
use crate::tensor::{DType, Tensor, TensorView};
use crate::{runtime, Error, CONTRACT_VERSION};

/// A borrowed tensor on the wire.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct FfiTensorRef<'a> {
    name: RStr<'a>,
    /// [`DType`] discriminant; an unknown code is an error, never a guess.
    dtype: u8,
    shape: RSlice<'a, usize>,
    data: RSlice<'a, u8>,
}

/// An owned tensor on the wire.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiTensor {
    name: RString,
    dtype: u8,
    shape: RVec<usize>,
    data: RVec<u8>,
}

/// `quantize`'s answer on the wire: tensors, plus the rest of [`Quantized`] as JSON.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiQuantized {
    tensors: RVec<FfiTensor>,
    extras: RString,
}

#[derive(Serialize, serde::Deserialize, Default)]
struct QuantizedExtras {
    loss: Option<f64>,
    input_scale: Option<Vec<f32>>,
}

impl FfiQuantized {
    fn new(q: Quantized) -> Self {
        let extras = QuantizedExtras { loss: q.loss, input_scale: q.input_scale };
        FfiQuantized { tensors: q.tensors.into_iter().map(FfiTensor::new).collect(), extras: to_json(&extras) }
    }

    fn into_quantized(self, method: &str) -> Result<Quantized, Error> {
        Ok(self.lend(method)?.into_quantized())
    }

    /// Checks the answer and keeps it where the plugin allocated it.
    fn lend(self, method: &str) -> Result<LentQuantized, Error> {
        let extras: QuantizedExtras = parse_reply(method, "quantize result", self.extras)?;
        let dtypes = self
            .tensors
            .iter()
            .map(|t| dtype_from_code(t.dtype).map_err(|e| Error::new(format!("method `{method}`, tensor `{}`: {e}", t.name))))
            .collect::<Result<_, _>>()?;
        Ok(LentQuantized { tensors: self.tensors, dtypes, loss: extras.loss, input_scale: extras.input_scale })
    }
}

/// What `quantize` returned, left in the plugin's own allocations and lent out as views.
/// Moving a plugin's vector into a host `Vec` copies it (abi_stable frees memory in the library
/// that allocated it), which for packed weights costs a pass over an eighth of the input or more.
pub struct LentQuantized {
    tensors: RVec<FfiTensor>,
    dtypes: Vec<DType>,
    /// The method's own loss ([`Quantized::loss`]).
    pub loss: Option<f64>,
    /// Factors to fold into the producing op ([`Quantized::input_scale`]).
    pub input_scale: Option<Vec<f32>>,
}

impl LentQuantized {
    /// The tensors, in the order the method returned them.
    pub fn views(&self) -> Vec<TensorView<'_>> {
        self.tensors
            .iter()
            .zip(&self.dtypes)
            .map(|(t, &dtype)| TensorView { name: t.name.as_str(), dtype, shape: &t.shape, data: &t.data })
            .collect()
    }

    /// Owned copies, for callers that keep the tensors.
    pub fn into_quantized(self) -> Quantized {
        let tensors = self
            .tensors
            .into_iter()
            .zip(self.dtypes)
            .map(|(t, dtype)| Tensor { name: t.name.into(), dtype, shape: t.shape.into(), data: t.data.into() })
            .collect();
        Quantized { tensors, loss: self.loss, input_scale: self.input_scale }
    }
}

fn dtype_from_code(code: u8) -> Result<DType, Error> {
    DType::ALL
        .get(code as usize)
        .copied()
        .ok_or_else(|| Error::new(format!("unknown dtype code {code} (newer contract?)")))
}

impl<'a> FfiTensorRef<'a> {
    /// Borrows a view for the wire.
    pub fn new(view: &TensorView<'a>) -> Self {
        FfiTensorRef {
            name: view.name.into(),
            dtype: view.dtype as u8,
            shape: view.shape.into(),
            data: view.data.into(),
        }
    }

    fn view(&self) -> Result<TensorView<'a>, Error> {
        let dtype = dtype_from_code(self.dtype)?;
        let view = TensorView { name: self.name.as_str(), dtype, shape: self.shape.as_slice(), data: self.data.as_slice() };
        if view.numel() * dtype.size() != view.data.len() {
            return Err(Error::new(format!(
                "tensor `{}`: {} bytes do not hold {:?} of {}",
                view.name,
                view.data.len(),
                view.shape,
                dtype
            )));
        }
        Ok(view)
    }
}

impl FfiTensor {
    fn new(t: Tensor) -> Self {
        FfiTensor { name: t.name.into(), dtype: t.dtype as u8, shape: t.shape.into(), data: t.data.into() }
    }
}

/// What the host lends a plugin: its thread budget, its logger and its progress display.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = HostCallbacksRef)))]
#[sabi(missing_field(option))]
pub struct HostCallbacks {
    /// Threads the plugin's pool gets.
    pub threads: u32,
    /// Most verbose `log` level the host shows (0 off, 1 error ... 5 trace).
    pub max_log_level: u8,
    /// Receives a log record: level (1 error ... 5 trace), target, message.
    pub log: extern "C" fn(u8, RStr<'_>, RStr<'_>),
    /// Receives progress inside one hook: units done, units total, message.
    #[sabi(last_prefix_field)]
    pub progress: extern "C" fn(u64, u64, RStr<'_>),
}

impl HostCallbacks {
    /// Leaks the callbacks into the `'static` prefix form the wire needs (once per host).
    pub fn leak(self) -> HostCallbacksRef {
        self.leak_into_prefix()
    }
}

/// One method as an `abi_stable` trait object. Every method returns `Err` with a user-facing
/// message instead of panicking; JSON arguments are the serde forms of the named types.
#[sabi_trait]
pub trait FfiMethod: Send + Sync {
    /// [`MethodInfo`] as JSON.
    fn info(&self) -> RString;
    /// User options (JSON object) to the full validated [`Config`]; `Err` is a JSON list of
    /// [`ConfigProblem`]s.
    fn validate_config(&self, user: RStr<'_>) -> RResult<RString, RString>;
    /// A checkpoint's `quantization_config` to this method's options (unvalidated).
    fn config_from_checkpoint(&self, quantization_config: RStr<'_>) -> RResult<RString, RString>;
    /// [`QuantMethod::validate_environment`].
    fn validate_environment(&self, env: RStr<'_>, config: RStr<'_>) -> RResult<(), RString>;
    /// [`QuantMethod::update_dtype`]: JSON `null` or a dtype, both ways.
    fn update_dtype(&self, requested: RStr<'_>, config: RStr<'_>) -> RResult<RString, RString>;
    /// [`QuantMethod::process_model_before_weight_loading`]: [`Skeleton`] to [`Plan`].
    fn plan(&self, skeleton: RStr<'_>, config: RStr<'_>) -> RResult<RString, RString>;
    /// [`QuantMethod::new_observer`]: a handle for `observe` and `quantize`.
    fn new_observer(&self, module: RStr<'_>, config: RStr<'_>) -> RResult<u64, RString>;
    /// [`Observer::observe`] on the observer `handle`.
    fn observe(&self, handle: u64, x: RSlice<'_, f32>, rows: u64) -> RResult<(), RString>;
    /// Frees the observer `handle`.
    fn drop_observer(&self, handle: u64);
    /// [`QuantMethod::quantize`] for the module [`ModulePlan`].
    fn quantize(
        &self,
        module: RStr<'_>,
        config: RStr<'_>,
        tensors: RSlice<'_, FfiTensorRef<'_>>,
        observer: ROption<u64>,
    ) -> RResult<FfiQuantized, RString>;
    /// [`QuantMethod::process_model_after_weight_loading`]: [`Summary`] to a JSON object.
    fn finish(&self, summary: RStr<'_>, config: RStr<'_>) -> RResult<RString, RString>;
    /// [`QuantMethod::linear_shape`], as `[out, in]`.
    fn linear_shape(&self, module: RStr<'_>, config: RStr<'_>, tensors: RSlice<'_, FfiTensorRef<'_>>)
        -> RResult<RVec<u64>, RString>;
    /// [`QuantMethod::dequantize`].
    fn dequantize(&self, module: RStr<'_>, config: RStr<'_>, tensors: RSlice<'_, FfiTensorRef<'_>>)
        -> RResult<RVec<f32>, RString>;
    /// [`QuantMethod::forward`].
    #[sabi(last_prefix_field)]
    fn forward(
        &self,
        module: RStr<'_>,
        config: RStr<'_>,
        tensors: RSlice<'_, FfiTensorRef<'_>>,
        x: RSlice<'_, f32>,
        rows: u64,
    ) -> RResult<RVec<f32>, RString>;
    /// [`QuantMethod::quantize_group`] (contract 1.1): `modules` is a JSON list of
    /// [`ModulePlan`]s; member `i` owns the next `counts[i]` entries of `tensors` and observer
    /// `observers[i]` (members may share a handle). Past the last prefix field, so 1.0 plugins
    /// still load; the host only calls it for plans with `fold_input_scales`, which they never set.
    fn quantize_group(
        &self,
        modules: RStr<'_>,
        config: RStr<'_>,
        tensors: RSlice<'_, FfiTensorRef<'_>>,
        counts: RSlice<'_, u64>,
        observers: RSlice<'_, ROption<u64>>,
    ) -> RResult<RVec<FfiQuantized>, RString>;
}

/// A boxed method on the wire.
pub type FfiMethodBox = FfiMethod_TO<'static, RBox<()>>;

/// The root module every plugin library exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// The contract version the plugin was built against (`MAJOR.MINOR.PATCH`).
    pub contract_version: RStr<'static>,
    /// Installs the host's callbacks and sizes the plugin's thread pool; called once, first.
    pub init: extern "C" fn(HostCallbacksRef) -> RResult<(), RString>,
    /// The methods this library provides.
    #[sabi(last_prefix_field)]
    pub methods: extern "C" fn() -> RResult<RVec<FfiMethodBox>, RString>,
}

impl RootModule for PluginModRef {
    abi_stable::declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "kvant_plugin";
    const NAME: &'static str = "kvant_plugin";
    const VERSION_STRINGS: VersionStrings = VersionStrings::new(CONTRACT_VERSION);
}

// ---------------------------------------------------------------- plugin side

/// Builds the root module; called by the code [`export_plugin!`](crate::export_plugin) expands to.
#[doc(hidden)]
pub fn root_module(methods: extern "C" fn() -> RResult<RVec<FfiMethodBox>, RString>) -> PluginModRef {
    let module = PluginMod { contract_version: RStr::from_str(CONTRACT_VERSION), init: init_plugin, methods };
    let leaked: &'static WithMetadata<PluginMod> = Box::leak(Box::new(WithMetadata::new(module)));
    PluginModRef(leaked.static_as_prefix())
}

extern "C" fn init_plugin(host: HostCallbacksRef) -> RResult<(), RString> {
    match catch_unwind(|| runtime::install_host(host)) {
        Ok(r) => r.map_err(|e| RString::from(e.0)).into(),
        Err(p) => RResult::RErr(format!("panicked while starting: {}", panic_message(&*p)).into()),
    }
}

/// Runs the method constructors of a plugin, catching panics.
#[doc(hidden)]
pub fn build_methods(make: impl FnOnce() -> Vec<FfiMethodBox>) -> RResult<RVec<FfiMethodBox>, RString> {
    match catch_unwind(AssertUnwindSafe(make)) {
        Ok(v) => RResult::ROk(v.into()),
        Err(p) => RResult::RErr(format!("panicked while creating its methods: {}", panic_message(&*p)).into()),
    }
}

/// Wraps an author's method for the wire.
#[doc(hidden)]
pub fn method_box<M: QuantMethod>(method: M) -> FfiMethodBox {
    let name = method.info().name;
    FfiMethod_TO::from_value(
        Adapter { method, name, observers: Mutex::new(HashMap::new()), next_observer: AtomicU64::new(1) },
        sabi_trait::TD_Opaque,
    )
}

type SharedObserver<O> = Arc<Mutex<O>>;

struct Adapter<M: QuantMethod> {
    method: M,
    name: String,
    observers: Mutex<HashMap<u64, SharedObserver<M::Observer>>>,
    next_observer: AtomicU64,
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

fn from_json<T: DeserializeOwned>(what: &str, s: RStr<'_>) -> Result<T, Error> {
    serde_json::from_str(s.as_str()).map_err(|e| Error::new(format!("malformed {what} from the host: {e}")))
}

fn to_json<T: Serialize>(v: &T) -> RString {
    serde_json::to_string(v).expect("contract values always serialise").into()
}

fn views<'a>(tensors: RSlice<'a, FfiTensorRef<'a>>) -> Result<Vec<TensorView<'a>>, Error> {
    tensors.iter().map(FfiTensorRef::view).collect()
}

impl<M: QuantMethod> Adapter<M> {
    /// Runs one hook inside the plugin's pool, turning errors and panics into messages.
    fn guard<T: Send>(&self, hook: &str, f: impl FnOnce() -> Result<T, Error> + Send) -> RResult<T, RString> {
        match catch_unwind(AssertUnwindSafe(|| runtime::in_pool(f))) {
            Ok(Ok(v)) => RResult::ROk(v),
            Ok(Err(e)) => RResult::RErr(e.0.into()),
            Err(p) => RResult::RErr(
                format!("method `{}` panicked in {hook}: {}", self.name, panic_message(&*p)).into(),
            ),
        }
    }

    fn config(&self, config: RStr<'_>) -> Result<Config, Error> {
        Ok(Config::from_validated(from_json::<Map<String, Value>>("config", config)?))
    }

    fn observer(&self, handle: u64) -> Result<SharedObserver<M::Observer>, Error> {
        self.observers
            .lock()
            .unwrap()
            .get(&handle)
            .cloned()
            .ok_or_else(|| Error::new(format!("method `{}`: no observer with handle {handle}", self.name)))
    }
}

impl<M: QuantMethod> FfiMethod for Adapter<M> {
    fn info(&self) -> RString {
        // An info() that panics leaves the host with a broken plugin; report it as JSON it rejects.
        match catch_unwind(AssertUnwindSafe(|| self.method.info())) {
            Ok(info) => to_json(&info),
            Err(p) => format!("panic: {}", panic_message(&*p)).into(),
        }
    }

    fn validate_config(&self, user: RStr<'_>) -> RResult<RString, RString> {
        let result = catch_unwind(AssertUnwindSafe(|| -> Result<Config, Vec<ConfigProblem>> {
            let user: Map<String, Value> = from_json("options", user)
                .map_err(|e| vec![ConfigProblem::new("(config)", e.0)])?;
            let config = Config::validate(&self.method.info().options, &user)?;
            let problems = self.method.check_config(&config);
            if problems.is_empty() {
                Ok(config)
            } else {
                Err(problems)
            }
        }));
        match result {
            Ok(Ok(config)) => RResult::ROk(to_json(config.values())),
            Ok(Err(problems)) => RResult::RErr(to_json(&problems)),
            Err(p) => RResult::RErr(to_json(&vec![ConfigProblem::new(
                "(config)",
                format!("method `{}` panicked while checking it: {}", self.name, panic_message(&*p)),
            )])),
        }
    }

    fn config_from_checkpoint(&self, qc: RStr<'_>) -> RResult<RString, RString> {
        self.guard("config_from_checkpoint", || {
            let qc: Map<String, Value> = from_json("quantization_config", qc)?;
            Ok(to_json(&self.method.config_from_checkpoint(&qc)?))
        })
    }

    fn validate_environment(&self, env: RStr<'_>, config: RStr<'_>) -> RResult<(), RString> {
        self.guard("validate_environment", || {
            let env: Environment = from_json("environment", env)?;
            self.method.validate_environment(&env, &self.config(config)?)
        })
    }

    fn update_dtype(&self, requested: RStr<'_>, config: RStr<'_>) -> RResult<RString, RString> {
        self.guard("update_dtype", || {
            let requested: Option<DType> = from_json("dtype", requested)?;
            Ok(to_json(&self.method.update_dtype(requested, &self.config(config)?)))
        })
    }

    fn plan(&self, skeleton: RStr<'_>, config: RStr<'_>) -> RResult<RString, RString> {
        self.guard("process_model_before_weight_loading", || {
            let skeleton: Skeleton = from_json("skeleton", skeleton)?;
            Ok(to_json(&self.method.process_model_before_weight_loading(&skeleton, &self.config(config)?)?))
        })
    }

    fn new_observer(&self, module: RStr<'_>, config: RStr<'_>) -> RResult<u64, RString> {
        self.guard("new_observer", || {
            let plan: ModulePlan = from_json("module plan", module)?;
            let observer = self.method.new_observer(&plan, &self.config(config)?)?;
            let handle = self.next_observer.fetch_add(1, Ordering::Relaxed);
            self.observers.lock().unwrap().insert(handle, Arc::new(Mutex::new(observer)));
            Ok(handle)
        })
    }

    fn observe(&self, handle: u64, x: RSlice<'_, f32>, rows: u64) -> RResult<(), RString> {
        self.guard("observe", || {
            let observer = self.observer(handle)?;
            let mut observer = observer.lock().unwrap();
            observer.observe(x.as_slice(), rows as usize)
        })
    }

    fn drop_observer(&self, handle: u64) {
        self.observers.lock().unwrap().remove(&handle);
    }

    fn quantize(
        &self,
        module: RStr<'_>,
        config: RStr<'_>,
        tensors: RSlice<'_, FfiTensorRef<'_>>,
        observer: ROption<u64>,
    ) -> RResult<FfiQuantized, RString> {
        self.guard("quantize", || {
            let plan: ModulePlan = from_json("module plan", module)?;
            let config = self.config(config)?;
            let views = views(tensors)?;
            let weights = ModuleTensors { plan: &plan, tensors: &views };
            let observer = observer.into_option().map(|h| self.observer(h)).transpose()?;
            let guard = observer.as_ref().map(|o| o.lock().unwrap());
            let q = self.method.quantize(&weights, guard.as_deref(), &config)?;
            Ok(FfiQuantized::new(q))
        })
    }

    fn quantize_group(
        &self,
        modules: RStr<'_>,
        config: RStr<'_>,
        tensors: RSlice<'_, FfiTensorRef<'_>>,
        counts: RSlice<'_, u64>,
        observers: RSlice<'_, ROption<u64>>,
    ) -> RResult<RVec<FfiQuantized>, RString> {
        self.guard("quantize_group", || {
            let plans: Vec<ModulePlan> = from_json("module plans", modules)?;
            let config = self.config(config)?;
            let views = views(tensors)?;
            let total: u64 = counts.iter().sum();
            if counts.len() != plans.len() || observers.len() != plans.len() || total as usize != views.len() {
                return Err(Error::new(format!(
                    "malformed group from the host: {} plans, {} tensor counts, {} observers, {} tensors",
                    plans.len(),
                    counts.len(),
                    observers.len(),
                    views.len()
                )));
            }
            let mut members = Vec::with_capacity(plans.len());
            let mut at = 0;
            for (plan, &n) in plans.iter().zip(counts.iter()) {
                members.push(ModuleTensors { plan, tensors: &views[at..at + n as usize] });
                at += n as usize;
            }
            // Members sharing an input share a handle: lock each observer once.
            let ids: Vec<Option<u64>> = observers.iter().map(|o| (*o).into_option()).collect();
            let mut handles: Vec<u64> = ids.iter().flatten().copied().collect();
            handles.sort_unstable();
            handles.dedup();
            let shared = handles.iter().map(|&h| self.observer(h)).collect::<Result<Vec<_>, _>>()?;
            let guards: Vec<_> = shared.iter().map(|o| o.lock().unwrap()).collect();
            let refs: Vec<Option<&M::Observer>> = ids
                .iter()
                .map(|id| id.map(|h| &*guards[handles.binary_search(&h).expect("collected above")]))
                .collect();
            let qs = self.method.quantize_group(&members, &refs, &config)?;
            if qs.len() != plans.len() {
                return Err(Error::new(format!("quantize_group returned {} results for {} modules", qs.len(), plans.len())));
            }
            Ok(qs.into_iter().map(FfiQuantized::new).collect())
        })
    }

    fn finish(&self, summary: RStr<'_>, config: RStr<'_>) -> RResult<RString, RString> {
        self.guard("process_model_after_weight_loading", || {
            let summary: Summary = from_json("summary", summary)?;
            Ok(to_json(&self.method.process_model_after_weight_loading(&summary, &self.config(config)?)?))
        })
    }

    fn linear_shape(
        &self,
        module: RStr<'_>,
        config: RStr<'_>,
        tensors: RSlice<'_, FfiTensorRef<'_>>,
    ) -> RResult<RVec<u64>, RString> {
        self.guard("linear_shape", || {
            let plan: ModulePlan = from_json("module plan", module)?;
            let views = views(tensors)?;
            let (out, inp) = self.method.linear_shape(&ModuleTensors { plan: &plan, tensors: &views }, &self.config(config)?)?;
            Ok(RVec::from(vec![out as u64, inp as u64]))
        })
    }

    fn dequantize(
        &self,
        module: RStr<'_>,
        config: RStr<'_>,
        tensors: RSlice<'_, FfiTensorRef<'_>>,
    ) -> RResult<RVec<f32>, RString> {
        self.guard("dequantize", || {
            let plan: ModulePlan = from_json("module plan", module)?;
            let views = views(tensors)?;
            let w = self.method.dequantize(&ModuleTensors { plan: &plan, tensors: &views }, &self.config(config)?)?;
            Ok(w.into())
        })
    }

    fn forward(
        &self,
        module: RStr<'_>,
        config: RStr<'_>,
        tensors: RSlice<'_, FfiTensorRef<'_>>,
        x: RSlice<'_, f32>,
        rows: u64,
    ) -> RResult<RVec<f32>, RString> {
        self.guard("forward", || {
            let plan: ModulePlan = from_json("module plan", module)?;
            let views = views(tensors)?;
            let module = ModuleTensors { plan: &plan, tensors: &views };
            Ok(self.method.forward(&module, x.as_slice(), rows as usize, &self.config(config)?)?.into())
        })
    }
}

// ---------------------------------------------------------------- host side

/// The host's typed handle on one method of a loaded plugin.
pub struct MethodClient {
    inner: FfiMethodBox,
    info: MethodInfo,
}

fn wire_err(e: RString) -> Error {
    Error::new(e.into_string())
}

fn parse_reply<T: DeserializeOwned>(method: &str, what: &str, s: RString) -> Result<T, Error> {
    serde_json::from_str(s.as_str()).map_err(|e| Error::new(format!("method `{method}` sent a malformed {what}: {e}")))
}

impl MethodClient {
    /// Reads the method's info; fails when the plugin's info is unreadable.
    pub fn new(inner: FfiMethodBox) -> Result<Self, Error> {
        let raw = inner.info();
        let info: MethodInfo = serde_json::from_str(raw.as_str())
            .map_err(|e| Error::new(format!("its method info is unreadable ({e}): {}", raw.as_str())))?;
        Ok(MethodClient { inner, info })
    }

    /// What the method declared.
    pub fn info(&self) -> &MethodInfo {
        &self.info
    }

    fn name(&self) -> &str {
        &self.info.name
    }

    fn config_json(config: &Config) -> String {
        serde_json::to_string(config.values()).expect("config serialises")
    }

    /// Validates user options; `Err` lists every problem.
    pub fn validate_config(&self, user: &Map<String, Value>) -> Result<Config, Vec<ConfigProblem>> {
        let user = serde_json::to_string(user).expect("options serialise");
        match self.inner.validate_config(user.as_str().into()) {
            RResult::ROk(s) => parse_reply(self.name(), "config", s)
                .map(Config::from_validated)
                .map_err(|e| vec![ConfigProblem::new("(config)", e.0)]),
            RResult::RErr(s) => Err(parse_reply(self.name(), "problem list", s)
                .unwrap_or_else(|e: Error| vec![ConfigProblem::new("(config)", e.0)])),
        }
    }

    /// Options from a checkpoint's `quantization_config`.
    pub fn config_from_checkpoint(&self, qc: &Map<String, Value>) -> Result<Map<String, Value>, Error> {
        let qc = serde_json::to_string(qc).expect("json serialises");
        let s = self.inner.config_from_checkpoint(qc.as_str().into()).into_result().map_err(wire_err)?;
        parse_reply(self.name(), "config", s)
    }

    /// [`QuantMethod::validate_environment`].
    pub fn validate_environment(&self, env: &Environment, config: &Config) -> Result<(), Error> {
        let env = serde_json::to_string(env).expect("environment serialises");
        let config = Self::config_json(config);
        self.inner.validate_environment(env.as_str().into(), config.as_str().into()).into_result().map_err(wire_err)
    }

    /// [`QuantMethod::update_dtype`].
    pub fn update_dtype(&self, requested: Option<DType>, config: &Config) -> Result<Option<DType>, Error> {
        let req = serde_json::to_string(&requested).expect("dtype serialises");
        let config = Self::config_json(config);
        let s = self.inner.update_dtype(req.as_str().into(), config.as_str().into()).into_result().map_err(wire_err)?;
        parse_reply(self.name(), "dtype", s)
    }

    /// [`QuantMethod::process_model_before_weight_loading`].
    pub fn plan(&self, skeleton: &Skeleton, config: &Config) -> Result<Plan, Error> {
        let sk = serde_json::to_string(skeleton).expect("skeleton serialises");
        let config = Self::config_json(config);
        let s = self.inner.plan(sk.as_str().into(), config.as_str().into()).into_result().map_err(wire_err)?;
        parse_reply(self.name(), "plan", s)
    }

    /// Starts an observer for `module`.
    pub fn new_observer(&self, module: &ModulePlan, config: &Config) -> Result<ObserverHandle<'_>, Error> {
        let m = serde_json::to_string(module).expect("plan serialises");
        let config = Self::config_json(config);
        let handle = self.inner.new_observer(m.as_str().into(), config.as_str().into()).into_result().map_err(wire_err)?;
        Ok(ObserverHandle { method: self, handle })
    }

    fn tensors_on_wire<'a>(tensors: &'a [TensorView<'a>]) -> Vec<FfiTensorRef<'a>> {
        tensors.iter().map(FfiTensorRef::new).collect()
    }

    /// [`QuantMethod::quantize`], with the tensors copied into host memory.
    pub fn quantize(
        &self,
        module: &ModulePlan,
        tensors: &[TensorView<'_>],
        observer: Option<&ObserverHandle<'_>>,
        config: &Config,
    ) -> Result<Quantized, Error> {
        Ok(self.quantize_lent(module, tensors, observer, config)?.into_quantized())
    }

    /// [`QuantMethod::quantize`], the tensors left in the plugin's memory (no copy), as
    /// [`dequantize_with`](Self::dequantize_with) does for dequantize.
    pub fn quantize_lent(
        &self,
        module: &ModulePlan,
        tensors: &[TensorView<'_>],
        observer: Option<&ObserverHandle<'_>>,
        config: &Config,
    ) -> Result<LentQuantized, Error> {
        let m = serde_json::to_string(module).expect("plan serialises");
        let config = Self::config_json(config);
        let wire = Self::tensors_on_wire(tensors);
        let handle = observer.map(|o| o.handle).into();
        let q = self
            .inner
            .quantize(m.as_str().into(), config.as_str().into(), wire.as_slice().into(), handle)
            .into_result()
            .map_err(wire_err)?;
        q.lend(self.name())
    }

    /// [`QuantMethod::quantize_group`]: `members[i]` with its `tensors[i]` and `observers[i]`.
    pub fn quantize_group(
        &self,
        members: &[&ModulePlan],
        tensors: &[Vec<TensorView<'_>>],
        observers: &[Option<&ObserverHandle<'_>>],
        config: &Config,
    ) -> Result<Vec<Quantized>, Error> {
        assert!(members.len() == tensors.len() && members.len() == observers.len(), "one entry per member");
        let m = serde_json::to_string(members).expect("plans serialise");
        let config = Self::config_json(config);
        let wire: Vec<FfiTensorRef<'_>> = tensors.iter().flatten().map(FfiTensorRef::new).collect();
        let counts: Vec<u64> = tensors.iter().map(|t| t.len() as u64).collect();
        let handles: Vec<ROption<u64>> = observers.iter().map(|o| o.map(|o| o.handle).into()).collect();
        let qs = self
            .inner
            .quantize_group(m.as_str().into(), config.as_str().into(), wire.as_slice().into(), counts.as_slice().into(), handles.as_slice().into())
            .into_result()
            .map_err(wire_err)?;
        if qs.len() != members.len() {
            return Err(Error::new(format!("method `{}` returned {} results for {} modules", self.name(), qs.len(), members.len())));
        }
        qs.into_iter().map(|q| q.into_quantized(self.name())).collect()
    }

    /// [`QuantMethod::process_model_after_weight_loading`].
    pub fn finish(&self, summary: &Summary, config: &Config) -> Result<Map<String, Value>, Error> {
        let s = serde_json::to_string(summary).expect("summary serialises");
        let config = Self::config_json(config);
        let r = self.inner.finish(s.as_str().into(), config.as_str().into()).into_result().map_err(wire_err)?;
        parse_reply(self.name(), "quantization_config", r)
    }

    /// [`QuantMethod::linear_shape`].
    pub fn linear_shape(&self, module: &ModulePlan, tensors: &[TensorView<'_>], config: &Config) -> Result<(usize, usize), Error> {
        let m = serde_json::to_string(module).expect("plan serialises");
        let config = Self::config_json(config);
        let wire = Self::tensors_on_wire(tensors);
        let r = self
            .inner
            .linear_shape(m.as_str().into(), config.as_str().into(), wire.as_slice().into())
            .into_result()
            .map_err(wire_err)?;
        match r.as_slice() {
            [out, inp] => Ok((*out as usize, *inp as usize)),
            other => Err(Error::new(format!("method `{}` sent a shape of {} numbers", self.name(), other.len()))),
        }
    }

    /// [`QuantMethod::dequantize`].
    pub fn dequantize(&self, module: &ModulePlan, tensors: &[TensorView<'_>], config: &Config) -> Result<Vec<f32>, Error> {
        Ok(self.dequantize_on_wire(module, tensors, config)?.into_vec())
    }

    /// [`QuantMethod::dequantize`], lending the result to `f` in the plugin's own allocation:
    /// moving it into a host `Vec` copies it (abi_stable frees memory in the library that
    /// allocated it), which costs as much as a large weight.
    pub fn dequantize_with<R>(
        &self,
        module: &ModulePlan,
        tensors: &[TensorView<'_>],
        config: &Config,
        f: impl FnOnce(&[f32]) -> R,
    ) -> Result<R, Error> {
        Ok(f(&self.dequantize_on_wire(module, tensors, config)?))
    }

    fn dequantize_on_wire(&self, module: &ModulePlan, tensors: &[TensorView<'_>], config: &Config) -> Result<RVec<f32>, Error> {
        let m = serde_json::to_string(module).expect("plan serialises");
        let config = Self::config_json(config);
        let wire = Self::tensors_on_wire(tensors);
        self.inner
            .dequantize(m.as_str().into(), config.as_str().into(), wire.as_slice().into())
            .into_result()
            .map_err(wire_err)
    }

    /// [`QuantMethod::forward`].
    pub fn forward(
        &self,
        module: &ModulePlan,
        tensors: &[TensorView<'_>],
        x: &[f32],
        rows: usize,
        config: &Config,
    ) -> Result<Vec<f32>, Error> {
        let m = serde_json::to_string(module).expect("plan serialises");
        let config = Self::config_json(config);
        let wire = Self::tensors_on_wire(tensors);
        let r = self
            .inner
            .forward(m.as_str().into(), config.as_str().into(), wire.as_slice().into(), x.into(), rows as u64)
            .into_result()
            .map_err(wire_err)?;
        Ok(r.into_vec())
    }
}

/// A live observer inside a plugin; freed when dropped.
pub struct ObserverHandle<'m> {
    method: &'m MethodClient,
    handle: u64,
}

impl ObserverHandle<'_> {
    /// Feeds one batch of `rows` input rows.
    pub fn observe(&self, x: &[f32], rows: usize) -> Result<(), Error> {
        self.method.inner.observe(self.handle, x.into(), rows as u64).into_result().map_err(wire_err)
    }
}

impl Drop for ObserverHandle<'_> {
    fn drop(&mut self) {
        self.method.inner.drop_observer(self.handle);
    }
}

/// Opens a plugin root module in-process (statically linked plugins and tests): runs `init`
/// and returns its methods.
pub fn methods_of(module: PluginModRef, host: HostCallbacksRef) -> Result<Vec<MethodClient>, Error> {
    module.init()(host).into_result().map_err(wire_err)?;
    let methods = module.methods()().into_result().map_err(wire_err)?;
    methods.into_iter().map(MethodClient::new).collect()
}
