//! `kvant plugin check`: the conformance suite every method of a plugin library must pass.
//!
//! The checks, per method:
//! - identity and flags: a usable name, `requires_calibration` agreeing with `required_packages`,
//!   every requirement string parseable, option keys unique;
//! - options: the defaults validate and survive a second validation unchanged; a value of the
//!   wrong type, one out of range and an unknown key are each rejected with a problem naming the
//!   key, and several bad keys at once are all reported;
//! - the path a checkpoint takes, on a one-module skeleton for several Linear shapes (square, a
//!   short last group of 128, odd, a single row) and F32/F16/BF16 Gaussian weights, with and
//!   without bias: plan, quantize (checked against the plan as the host does), `linear_shape`,
//!   `dequantize` within the method's declared tolerance, and `forward` against dequantize plus a
//!   dense matmul within its declared `forward_tolerance`. Calibration methods get an observer
//!   fed with random batches first. A `read_only` method must refuse to plan each of them instead;
//! - serializable methods: the `quantization_config` they write is recognised by their own
//!   `answers_to` and reads back to the same options.

use std::fmt;
use std::path::{Path, PathBuf};

use kvant_plugin_api::dense::{linear_forward, relative_error};
use kvant_plugin_api::ffi::MethodClient;
use kvant_plugin_api::tensor::{from_f32, to_f32};
use kvant_plugin_api::{
    Config, DType, MethodInfo, Module, ModuleKind, ModulePlan, OptionKind, OptionSpec, Skeleton, Summary, Tensor,
    TensorView,
};
use serde_json::{json, Map, Value};

use crate::lifecycle::check_against_plan;
use crate::registry::open_plugin;
use crate::requirements::{self, Requirement};

/// The module name used in the one-module skeletons.
const MODULE: &str = "model.layers.0.mlp.down_proj";

/// Rows of input given to `forward`, and per batch to a calibration observer.
const ROWS: usize = 3;
const CALIBRATION_BATCHES: u64 = 4;
const CALIBRATION_ROWS: usize = 16;

/// The outcome of one check of one method.
#[derive(Clone, Debug)]
pub struct Check {
    /// The method checked.
    pub method: String,
    /// What was checked.
    pub name: String,
    /// `Ok` with a short detail, or `Err` with the reason it failed.
    pub outcome: Result<String, String>,
}

impl Check {
    /// True when the check passed.
    pub fn passed(&self) -> bool {
        self.outcome.is_ok()
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Ok(detail) if detail.is_empty() => write!(f, "PASS {} {}", self.method, self.name),
            Ok(detail) => write!(f, "PASS {} {} ({detail})", self.method, self.name),
            Err(reason) => write!(f, "FAIL {} {}: {reason}", self.method, self.name),
        }
    }
}

/// Every check of every method of one library.
#[derive(Clone, Debug)]
pub struct Report {
    /// The library checked.
    pub path: PathBuf,
    /// The names of its methods, in the order it declares them.
    pub methods: Vec<String>,
    /// The checks, method by method.
    pub checks: Vec<Check>,
}

impl Report {
    /// True when every check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(Check::passed)
    }

    /// The checks that failed.
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.passed())
    }
}

/// Opens the library at `path` and runs the suite on each of its methods. `Err` when the
/// library cannot be used at all (not a plugin, other contract, failing to start).
pub fn check_library(path: &Path, threads: usize) -> Result<Report, String> {
    let methods = open_plugin(path, threads)?;
    Ok(Report {
        path: path.to_path_buf(),
        methods: methods.iter().map(|m| m.info().name.clone()).collect(),
        checks: methods.iter().flat_map(check_method).collect(),
    })
}

/// Runs the suite on one method.
pub fn check_method(method: &MethodClient) -> Vec<Check> {
    let info = method.info();
    let mut checks = Vec::new();
    let mut record = |name: &str, outcome: Result<String, String>| {
        checks.push(Check { method: info.name.clone(), name: name.into(), outcome })
    };
    record("identity", identity(info));
    record("flags consistent", flags(info));
    record("option keys unique", unique_keys(&info.options));
    let defaults = defaults(method);
    record("defaults valid", defaults.as_ref().map(|_| String::new()).map_err(Clone::clone));
    record("wrong types rejected", each_option_rejects(method, |o| Some(wrong_type(&o.kind))));
    record("out-of-range values rejected", each_option_rejects(method, |o| out_of_range(&o.kind)));
    record("unknown key rejected", unknown_key_rejected(method));
    record("every problem reported", every_problem_reported(method));
    let Ok(config) = defaults else { return checks };
    for case in cases() {
        if info.read_only {
            record(&format!("{case} refused (read-only)"), refuses_to_plan(method, &config, &case));
        } else {
            record(&case.to_string(), round_trip(method, &config, &case));
        }
    }
    if info.flags.is_serializable {
        record("quantization_config reads back", reads_back(method, &config));
    }
    checks
}

fn identity(info: &MethodInfo) -> Result<String, String> {
    let mut problems = Vec::new();
    if info.name.is_empty() || info.name.chars().any(|c| c.is_whitespace() || c.is_uppercase()) {
        problems.push(format!("name `{}` must be non-empty, lowercase, without spaces", info.name));
    }
    if info.version.trim().is_empty() {
        problems.push("version is empty".into());
    }
    if info.description.trim().is_empty() || info.description.contains('\n') {
        problems.push("description must be one non-empty line".into());
    }
    if !(info.tolerance.is_finite() && info.tolerance > 0.0) {
        problems.push(format!("tolerance {} must be a positive number", info.tolerance));
    }
    if !(info.forward_tolerance.is_finite() && info.forward_tolerance > 0.0) {
        problems.push(format!("forward_tolerance {} must be a positive number", info.forward_tolerance));
    }
    joined(problems, format!("version {}", info.version))
}

fn flags(info: &MethodInfo) -> Result<String, String> {
    let mut problems = Vec::new();
    let mut wants_calibration = false;
    for raw in &info.required_packages {
        match requirements::parse(raw) {
            Ok(Requirement::Calibration) => wants_calibration = true,
            Ok(_) => {}
            Err(e) => problems.push(e),
        }
    }
    if wants_calibration != info.flags.requires_calibration {
        problems.push(format!(
            "requires_calibration is {} but `calibration` is {}in required_packages",
            info.flags.requires_calibration,
            if wants_calibration { "" } else { "not " }
        ));
    }
    let f = &info.flags;
    if info.read_only && (f.is_serializable || f.requires_calibration || f.requires_parameters_quantization) {
        problems.push(
            "read_only, yet it declares is_serializable, requires_calibration or requires_parameters_quantization, \
             which are about quantizing"
                .into(),
        );
    }
    joined(problems, String::new())
}

fn unique_keys(options: &[OptionSpec]) -> Result<String, String> {
    let mut seen = std::collections::HashSet::new();
    let twice: Vec<String> =
        options.iter().filter(|o| !seen.insert(o.key.as_str())).map(|o| format!("`{}`", o.key)).collect();
    if twice.is_empty() {
        Ok(format!("{} option(s)", options.len()))
    } else {
        Err(format!("option key(s) published more than once: {}", twice.join(", ")))
    }
}

fn defaults(method: &MethodClient) -> Result<Config, String> {
    let config =
        method.validate_config(&Map::new()).map_err(|p| format!("the defaults are rejected: {}", problems_text(&p)))?;
    let again = method
        .validate_config(config.values())
        .map_err(|p| format!("the validated defaults are rejected when given back: {}", problems_text(&p)))?;
    if again != config {
        return Err(format!(
            "validating the validated defaults changes them: {} became {}",
            Value::Object(config.values().clone()),
            Value::Object(again.values().clone())
        ));
    }
    Ok(config)
}

/// A value no option of this kind accepts, even as a `--set` string.
fn wrong_type(kind: &OptionKind) -> Value {
    match kind {
        OptionKind::Bool => json!("maybe"),
        OptionKind::Int { .. } | OptionKind::IntChoice { .. } | OptionKind::Float { .. } => json!("many"),
        OptionKind::Choice { .. } | OptionKind::String | OptionKind::StringList => json!(7),
    }
}

/// A value of the right type outside the allowed ones, for kinds that have limits.
fn out_of_range(kind: &OptionKind) -> Option<Value> {
    match kind {
        OptionKind::Int { min, max } => max.checked_add(1).or_else(|| min.checked_sub(1)).map(Value::from),
        OptionKind::IntChoice { values } => values.iter().max().and_then(|m| m.checked_add(1)).map(Value::from),
        OptionKind::Float { min, max } => {
            [max + max.abs().max(1.0), min - min.abs().max(1.0)].into_iter().find(|v| v.is_finite()).map(Value::from)
        }
        OptionKind::Choice { values } => Some(Value::from(format!("not-{}", values.join("-or-")))),
        OptionKind::Bool | OptionKind::String | OptionKind::StringList => None,
    }
}

/// Gives each option, alone, the value `bad` makes for it; every one must be rejected with a
/// problem naming that option.
fn each_option_rejects(method: &MethodClient, bad: impl Fn(&OptionSpec) -> Option<Value>) -> Result<String, String> {
    let mut tried = 0;
    let mut problems = Vec::new();
    for option in &method.info().options {
        let Some(value) = bad(option) else { continue };
        tried += 1;
        if let Err(e) = rejected_naming(method, &[(option.key.as_str(), value)]) {
            problems.push(e);
        }
    }
    joined(problems, format!("{tried} option(s) tried"))
}

fn unknown_key_rejected(method: &MethodClient) -> Result<String, String> {
    rejected_naming(method, &[("kvant_check_no_such_option", json!(1))]).map(|_| String::new())
}

fn every_problem_reported(method: &MethodClient) -> Result<String, String> {
    let mut bad: Vec<(&str, Value)> =
        method.info().options.iter().map(|o| (o.key.as_str(), wrong_type(&o.kind))).collect();
    bad.push(("kvant_check_unknown_a", json!(true)));
    bad.push(("kvant_check_unknown_b", json!("x")));
    rejected_naming(method, &bad).map(|_| format!("{} bad keys at once", bad.len()))
}

/// Validates `user`; it must fail with a problem naming each of its keys.
fn rejected_naming(method: &MethodClient, user: &[(&str, Value)]) -> Result<(), String> {
    let map: Map<String, Value> = user.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    let problems = match method.validate_config(&map) {
        Ok(_) => return Err(format!("{} was accepted", Value::Object(map))),
        Err(p) => p,
    };
    let unnamed: Vec<String> =
        user.iter().filter(|(k, _)| !problems.iter().any(|p| p.key == *k)).map(|(k, _)| format!("`{k}`")).collect();
    if unnamed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} was rejected, but no problem names {} (got: {})",
            Value::Object(map),
            unnamed.join(", "),
            problems_text(&problems)
        ))
    }
}

fn problems_text(problems: &[kvant_plugin_api::ConfigProblem]) -> String {
    problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; ")
}

fn joined(problems: Vec<String>, detail: String) -> Result<String, String> {
    if problems.is_empty() {
        Ok(detail)
    } else {
        Err(problems.join("; "))
    }
}

/// One Linear the suite quantizes.
#[derive(Clone, Copy)]
struct Case {
    out: usize,
    inp: usize,
    dtype: DType,
    bias: bool,
    seed: u64,
    /// Whether the plan may keep it dense (only the plain first case must convert).
    may_stay_dense: bool,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bias = if self.bias { " +bias" } else { "" };
        write!(f, "round trip {}x{} {}{bias}", self.out, self.inp, self.dtype)
    }
}

/// Every shape in every dtype; bias alternates so each shape and each dtype is seen with and
/// without one.
fn cases() -> Vec<Case> {
    const SHAPES: [(usize, usize); 4] = [(64, 64), (96, 576), (33, 70), (1, 256)];
    const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
    let mut cases = Vec::new();
    for (s, &(out, inp)) in SHAPES.iter().enumerate() {
        for (d, &dtype) in DTYPES.iter().enumerate() {
            let seed = (s * DTYPES.len() + d) as u64 * 1000;
            cases.push(Case { out, inp, dtype, bias: (s + d) % 2 == 1, seed, may_stay_dense: s + d > 0 });
        }
    }
    cases
}

/// The case's dense weight and bias, and the one-module skeleton holding them.
fn dense_case(case: &Case) -> (Tensor, Option<Tensor>, Skeleton) {
    let (out, inp) = (case.out, case.inp);
    let weight = Tensor {
        name: "weight".into(),
        dtype: case.dtype,
        shape: vec![out, inp],
        data: from_f32(case.dtype, &gaussian(case.seed, out * inp)),
    };
    let bias = case.bias.then(|| Tensor {
        name: "bias".into(),
        dtype: case.dtype,
        shape: vec![out],
        data: from_f32(case.dtype, &gaussian(case.seed + 1, out)),
    });
    let skeleton = Skeleton {
        model_type: "kvant-check".into(),
        config: json!({"model_type": "kvant-check"}),
        modules: vec![Module {
            name: MODULE.into(),
            kind: ModuleKind::Linear,
            tensors: std::iter::once(&weight).chain(&bias).map(Tensor::spec).collect(),
            not_converted: None,
        }],
    };
    (weight, bias, skeleton)
}

/// A read-only method must refuse the plan with a message (what `kvant quantize` would show).
fn refuses_to_plan(method: &MethodClient, config: &Config, case: &Case) -> Result<String, String> {
    let (_, _, skeleton) = dense_case(case);
    match method.plan(&skeleton, config) {
        Ok(plan) => Err(format!("read_only, but it plans to convert {} module(s)", plan.modules.len())),
        Err(e) if e.0.trim().is_empty() => Err("read_only, and its refusal to plan says nothing".into()),
        Err(_) => Ok(String::new()),
    }
}

/// Plan, quantize, check against the plan, `linear_shape`, dequantize and forward for one case.
fn round_trip(method: &MethodClient, config: &Config, case: &Case) -> Result<String, String> {
    let (out, inp) = (case.out, case.inp);
    let (weight, bias, skeleton) = dense_case(case);
    let dense: Vec<&Tensor> = std::iter::once(&weight).chain(&bias).collect();

    let plan = method.plan(&skeleton, config).map_err(|e| format!("process_model_before_weight_loading: {e}"))?;
    let module = match plan.modules.as_slice() {
        [] if case.may_stay_dense => return Ok("kept dense by the plan".into()),
        [] => return Err("the plan keeps a plain Linear dense".into()),
        [m] if m.name == MODULE && m.shape == (out, inp) => m,
        [m] => {
            return Err(format!(
                "the plan converts `{}` {:?}; the skeleton has `{MODULE}` {:?}",
                m.name,
                m.shape,
                (out, inp)
            ))
        }
        more => return Err(format!("the plan converts {} modules; the skeleton has one", more.len())),
    };
    if case.bias && !module.tensors.iter().any(|t| t.name == "bias") {
        return Err("the plan drops the module's bias".into());
    }

    let views: Vec<TensorView<'_>> = dense.iter().map(|t| t.view()).collect();
    let observer = if method.info().flags.requires_calibration {
        let observer = method.new_observer(module, config).map_err(|e| format!("new_observer: {e}"))?;
        for batch in 0..CALIBRATION_BATCHES {
            let x = gaussian(case.seed + 100 + batch, CALIBRATION_ROWS * inp);
            observer.observe(&x, CALIBRATION_ROWS).map_err(|e| format!("observe: {e}"))?;
        }
        Some(observer)
    } else {
        None
    };
    let quantized = method.quantize(module, &views, observer.as_ref(), config).map_err(|e| format!("quantize: {e}"))?;
    check_against_plan(module, &quantized.tensors).map_err(|e| format!("quantize: {e:#}"))?;
    let packed: Vec<TensorView<'_>> = quantized.tensors.iter().map(Tensor::view).collect();

    // As for a pre-quantized checkpoint: only the module name and its packed tensors are known.
    let unknown = ModulePlan { name: MODULE.into(), shape: (0, 0), tensors: vec![], attrs: Value::Null };
    let shape = method.linear_shape(&unknown, &packed, config).map_err(|e| format!("linear_shape: {e}"))?;
    if shape != (out, inp) {
        return Err(format!("linear_shape gives {shape:?} for a {out}x{inp} Linear"));
    }

    let back = method.dequantize(module, &packed, config).map_err(|e| format!("dequantize: {e}"))?;
    if back.len() != out * inp {
        return Err(format!("dequantize returned {} values for a {out}x{inp} Linear", back.len()));
    }
    if back.iter().any(|v| !v.is_finite()) {
        return Err("dequantize returned NaN or infinite values".into());
    }
    let original = to_f32(case.dtype, &weight.data);
    let error = relative_error(&back, &original);
    let tolerance = method.info().tolerance;
    if error.is_nan() || error > f64::from(tolerance) {
        return Err(format!("relative error {error:.4} exceeds the declared tolerance {tolerance}"));
    }

    let x = gaussian(case.seed + 2, ROWS * inp);
    let y = method.forward(module, &packed, &x, ROWS, config).map_err(|e| format!("forward: {e}"))?;
    let bias_values = bias.as_ref().map(|b| to_f32(b.dtype, &b.data));
    let expected = linear_forward(&x, ROWS, &back, (out, inp), bias_values.as_deref());
    if y.len() != expected.len() {
        return Err(format!("forward returned {} values for {ROWS} rows of a {out}x{inp} Linear", y.len()));
    }
    let forward_error = relative_error(&y, &expected);
    let forward_tolerance = method.info().forward_tolerance;
    if forward_error.is_nan() || forward_error > f64::from(forward_tolerance) {
        return Err(format!(
            "forward differs from dequantize + matmul by {forward_error:.2e} (relative; the declared forward_tolerance is \
             {forward_tolerance:e})"
        ));
    }
    Ok(format!("error {error:.4} <= {tolerance}, forward {forward_error:.1e} <= {forward_tolerance:e}"))
}

/// The `quantization_config` the method writes must select it again and give back its options.
fn reads_back(method: &MethodClient, config: &Config) -> Result<String, String> {
    let info = method.info();
    let summary = Summary { converted: vec![MODULE.into()], not_converted: vec![], dtype: None };
    let qc = method.finish(&summary, config).map_err(|e| format!("process_model_after_weight_loading: {e}"))?;
    let recognised = info.answers_to.iter().any(|pattern| pattern.iter().all(|(k, v)| qc.get(k) == Some(v)));
    if !recognised {
        return Err(format!(
            "its quantization_config {} matches none of its answers_to patterns, so its checkpoints cannot be read back",
            Value::Object(qc)
        ));
    }
    let options = method.config_from_checkpoint(&qc).map_err(|e| format!("config_from_checkpoint: {e}"))?;
    let again = method.validate_config(&options).map_err(|p| {
        format!("the options read back from its quantization_config are rejected: {}", problems_text(&p))
    })?;
    if &again != config {
        return Err(format!(
            "options {} read back as {}",
            Value::Object(config.values().clone()),
            Value::Object(again.values().clone())
        ));
    }
    Ok(String::new())
}

/// `n` standard normal values, the same for a `seed` on every machine (SplitMix64 feeding a
/// Box-Muller transform), so failures reproduce.
pub fn gaussian(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed;
    let mut uniform = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // In (0, 1]: never 0, so the logarithm below stays finite.
        ((z >> 11) + 1) as f64 / (1u64 << 53) as f64
    };
    let mut values = Vec::with_capacity(n + 1);
    while values.len() < n {
        let radius = (-2.0 * uniform().ln()).sqrt();
        let angle = std::f64::consts::TAU * uniform();
        values.push((radius * angle.cos()) as f32);
        values.push((radius * angle.sin()) as f32);
    }
    values.truncate(n);
    values
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvant_plugin_api::ffi::method_box;
    use kvant_plugin_api::{
        Error, Flags, ModuleTensors, NoCalibration, QuantMethod, Quantized, TensorSpec, DEFAULT_FORWARD_TOLERANCE,
    };

    /// Keeps weights as F32, plus a note whose length depends on them (a variable-length tensor);
    /// its forward is off by `forward_scale`.
    struct Exact {
        forward_scale: f32,
        forward_tolerance: f32,
        read_only: bool,
        serializable: bool,
    }

    impl Exact {
        fn client(forward_scale: f32, forward_tolerance: f32) -> MethodClient {
            let m = Exact { forward_scale, forward_tolerance, read_only: false, serializable: true };
            MethodClient::new(method_box(m)).unwrap()
        }
    }

    impl QuantMethod for Exact {
        type Observer = NoCalibration;

        fn info(&self) -> MethodInfo {
            MethodInfo {
                name: "exact".into(),
                version: "1".into(),
                description: "F32 copies".into(),
                answers_to: vec![json!({"quant_method": "exact"}).as_object().unwrap().clone()],
                flags: Flags { is_serializable: self.serializable, ..Flags::default() },
                required_packages: vec![],
                options: vec![],
                tolerance: 1e-6,
                forward_tolerance: self.forward_tolerance,
                read_only: self.read_only,
                config_files: Vec::new(),
            }
        }

        fn plan_linear(&self, module: &Module, _: &Config) -> kvant_plugin_api::Result<Option<ModulePlan>> {
            if self.read_only {
                return Err(Error::new(format!("module `{}`: exact only reads", module.name)));
            }
            let (out, inp) = module.linear_shape().unwrap();
            let mut tensors = vec![TensorSpec::new("w", DType::F32, [out, inp]), TensorSpec::variable("note", DType::U8, 24)];
            tensors.extend(module.tensors.iter().filter(|t| t.name == "bias").cloned());
            Ok(Some(ModulePlan { name: module.name.clone(), shape: (out, inp), tensors, attrs: Value::Null }))
        }

        fn quantize(&self, m: &ModuleTensors<'_>, _: Option<&NoCalibration>, _: &Config) -> kvant_plugin_api::Result<Quantized> {
            let w = m.get("weight")?;
            let note = format!("{}", w.to_f32()[0]).into_bytes();
            let mut tensors = vec![
                Tensor::f32("w", w.shape, &w.to_f32()),
                Tensor { name: "note".into(), dtype: DType::U8, shape: vec![note.len()], data: note },
            ];
            if let Some(b) = m.find("bias") {
                tensors.push(Tensor { name: "bias".into(), dtype: b.dtype, shape: b.shape.to_vec(), data: b.data.to_vec() });
            }
            Ok(Quantized::tensors(tensors))
        }

        fn linear_shape(&self, m: &ModuleTensors<'_>, _: &Config) -> kvant_plugin_api::Result<(usize, usize)> {
            let w = m.get("w")?;
            Ok((w.shape[0], w.shape[1]))
        }

        fn dequantize(&self, m: &ModuleTensors<'_>, _: &Config) -> kvant_plugin_api::Result<Vec<f32>> {
            Ok(m.get("w")?.to_f32())
        }

        fn forward(&self, m: &ModuleTensors<'_>, x: &[f32], rows: usize, _: &Config) -> kvant_plugin_api::Result<Vec<f32>> {
            let bias = m.find("bias").map(|b| b.to_f32());
            let y = linear_forward(x, rows, &m.get("w")?.to_f32(), m.plan.shape, bias.as_deref());
            Ok(y.into_iter().map(|v| v * self.forward_scale).collect())
        }
    }

    fn failures(method: &MethodClient) -> Vec<String> {
        check_method(method).into_iter().filter(|c| !c.passed()).map(|c| c.to_string()).collect()
    }

    #[test]
    fn forward_is_held_to_the_declared_tolerance() {
        // Variable-length tensors pass the plan check; a forward 0.5 % off fails the default
        // tolerance and passes a declared 1 %.
        assert_eq!(failures(&Exact::client(1.0, DEFAULT_FORWARD_TOLERANCE)), Vec::<String>::new());
        let off = failures(&Exact::client(1.005, DEFAULT_FORWARD_TOLERANCE));
        assert_eq!(off.len(), cases().len(), "{off:#?}");
        assert!(off[0].contains("forward differs") && off[0].contains("forward_tolerance is 1e-3"), "{}", off[0]);
        assert_eq!(failures(&Exact::client(1.005, 0.01)), Vec::<String>::new());
        let bad = failures(&Exact::client(1.0, -1.0));
        assert!(bad.iter().any(|f| f.contains("identity") && f.contains("forward_tolerance -1 must be")), "{bad:#?}");
    }

    #[test]
    fn read_only_methods_must_refuse_to_plan() {
        let method = |read_only, serializable| {
            let m = Exact { forward_scale: 1.0, forward_tolerance: 1e-3, read_only, serializable };
            MethodClient::new(method_box(m)).unwrap()
        };
        let checks = check_method(&method(true, false));
        assert!(checks.iter().all(Check::passed), "{:#?}", checks.iter().filter(|c| !c.passed()).collect::<Vec<_>>());
        assert_eq!(checks.iter().filter(|c| c.name.ends_with("refused (read-only)")).count(), cases().len());
        let bad = failures(&method(true, true));
        assert!(bad.iter().any(|f| f.contains("flags consistent") && f.contains("read_only")), "{bad:#?}");
        // Planning anyway is caught.
        let plans = method(false, false);
        let config = plans.validate_config(&Map::new()).unwrap();
        let refused = refuses_to_plan(&plans, &config, &cases()[0]).unwrap_err();
        assert!(refused.contains("plans to convert 1 module"), "{refused}");
    }

    #[test]
    fn gaussian_is_reproducible_and_standard() {
        let a = gaussian(7, 20_001);
        assert_eq!(a, gaussian(7, 20_001));
        assert_ne!(a[..10], gaussian(8, 10)[..]);
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean}, variance {var}");
    }

    #[test]
    fn bad_values_are_outside_every_kind() {
        let int = OptionSpec::int("group_size", 128, -1, 4096, "");
        assert_eq!(out_of_range(&int.kind), Some(json!(4097)));
        let choice = OptionSpec::int_choice("bits", 4, &[2, 4, 8], "");
        assert_eq!(out_of_range(&choice.kind), Some(json!(9)));
        let unbounded = OptionSpec::int("n", 0, i64::MIN, i64::MAX, "");
        assert_eq!(out_of_range(&unbounded.kind), None);
        let float = OptionSpec::float("damp", 0.01, 0.0, 1.0, "");
        assert_eq!(out_of_range(&float.kind), Some(json!(2.0)));
        let text = OptionSpec::choice("quant_type", "nf4", &["nf4", "fp4"], "");
        assert_eq!(out_of_range(&text.kind), Some(json!("not-nf4-or-fp4")));
        for option in
            [int, choice, float, text, OptionSpec::bool("sym", true, ""), OptionSpec::string_list("skip", false, "")]
        {
            let user: Map<String, Value> = [(option.key.clone(), wrong_type(&option.kind))].into_iter().collect();
            assert!(
                Config::validate(std::slice::from_ref(&option), &user).is_err(),
                "{} accepted {:?}",
                option.key,
                user
            );
        }
    }

    #[test]
    fn cases_cover_every_shape_and_dtype_with_and_without_bias() {
        let cases = cases();
        assert_eq!(cases.len(), 12);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            assert!(cases.iter().any(|c| c.dtype == dtype && c.bias));
            assert!(cases.iter().any(|c| c.dtype == dtype && !c.bias));
        }
        for shape in [(64, 64), (96, 576), (33, 70), (1, 256)] {
            assert!(cases.iter().any(|c| (c.out, c.inp) == shape && c.bias));
            assert!(cases.iter().any(|c| (c.out, c.inp) == shape && !c.bias));
        }
        assert_eq!(cases.iter().filter(|c| !c.may_stay_dense).count(), 1);
    }
}
