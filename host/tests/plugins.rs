//! Plugins as the host meets them: discovery through registry.toml and the drop-in folder,
//! libraries that are not plugins or speak another contract, name conflicts, plugins that panic
//! or return bad tensors, rtn end to end on checkpoints written here, the conformance suite, and
//! the CLI's exit codes.

#[allow(dead_code)]
mod common;

use std::path::Path;

use common::{
    drop_in, kvant, load_folder, load_registry, registry_for, text, toml_path, write_llama, write_registry, Plugin,
    LLAMA_LINEARS,
};
use kvant::checkpoint::Checkpoint;
use kvant::conformance::{check_library, gaussian};
use kvant::lifecycle::{self, QuantizeRequest};
use kvant::registry::{open_plugin, Origin, Registry};
use kvant_plugin_api::dense::relative_error;
use kvant_plugin_api::{DType, Module, ModuleKind, Skeleton, TensorView, CONTRACT_VERSION};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

fn sha256_of(path: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(path).unwrap()))
}

fn broken_reason<'r>(registry: &'r Registry, file: &Path) -> &'r str {
    let broken = registry.broken().iter().find(|b| b.path == file);
    &broken.unwrap_or_else(|| panic!("{} is not listed as broken: {:?}", file.display(), registry.broken())).reason
}

fn quantize_request(model: &Path, method: &str, options: Value, out: &Path) -> QuantizeRequest {
    QuantizeRequest {
        model: model.to_path_buf(),
        method: Some(method.into()),
        options: options.as_object().cloned().unwrap_or_default(),
        out: out.to_path_buf(),
        threads: 2,
        max_shard_bytes: kvant::checkpoint::DEFAULT_MAX_SHARD_BYTES,
        ..Default::default()
    }
}

// ------------------------------------------------------------------------------- discovery

#[test]
fn registry_entry_loads_when_its_sha256_pin_matches_and_not_otherwise() {
    let tmp = TempDir::new().unwrap();
    let rtn = Plugin::Rtn.library();
    let pinned = format!("[methods.rtn]\nlibrary = {}\nsha256 = \"{}\"\n", toml_path(&rtn), sha256_of(&rtn));
    let registry = load_registry(&write_registry(tmp.path(), &pinned)).unwrap();
    let method = registry.get("rtn").unwrap();
    assert_eq!(method.origin, Origin::Registry(rtn.clone()));
    assert_eq!(method.client.info().name, "rtn");
    assert!(registry.broken().is_empty(), "{:?}", registry.broken());

    let wrong_pin = format!("[methods.rtn]\nlibrary = {}\nsha256 = \"{}\"\n", toml_path(&rtn), "ab".repeat(32));
    let registry = load_registry(&write_registry(tmp.path(), &wrong_pin)).unwrap();
    assert!(registry.get("rtn").is_err());
    let reason = broken_reason(&registry, &rtn);
    assert!(reason.contains("sha256") && reason.contains(&"ab".repeat(32)), "{reason}");
}

#[test]
fn disabled_registry_entry_is_not_loaded_and_says_so() {
    let tmp = TempDir::new().unwrap();
    let body = format!("[methods.rtn]\nlibrary = {}\nenabled = false\n", toml_path(&Plugin::Rtn.library()));
    let registry = load_registry(&write_registry(tmp.path(), &body)).unwrap();
    assert_eq!(registry.methods().count(), 0);
    assert_eq!(registry.disabled().len(), 1);
    assert_eq!(registry.disabled()[0].0, "rtn");
    let error = registry.get("rtn").err().unwrap().to_string();
    assert!(error.contains("disabled"), "{error}");
}

#[test]
fn drop_in_folder_registers_every_method_under_its_declared_name() {
    let tmp = TempDir::new().unwrap();
    // The registry's plugins_dir is relative to the registry file.
    let plugins = tmp.path().join("plugins.d");
    std::fs::create_dir(&plugins).unwrap();
    let rtn = drop_in(&plugins, Plugin::Rtn, "librtn.so");
    let bad = drop_in(&plugins, Plugin::BadOutput, "libbad.so");
    let registry = load_registry(&write_registry(tmp.path(), "plugins_dir = \"plugins.d\"\n")).unwrap();
    let names: Vec<&str> = registry.methods().map(|(n, _)| n).collect();
    assert_eq!(names, ["bad-nan", "bad-shape", "rtn"]);
    assert_eq!(registry.get("rtn").unwrap().origin, Origin::DropIn(rtn));
    assert_eq!(registry.get("bad-nan").unwrap().origin, Origin::DropIn(bad));

    // The same folder given directly (--plugins-dir) finds the same methods.
    assert_eq!(load_folder(&plugins).unwrap().methods().count(), 3);
}

#[test]
fn files_that_are_not_plugins_are_listed_broken_with_the_reason() {
    let tmp = TempDir::new().unwrap();
    let noise = tmp.path().join("x.so");
    std::fs::write(&noise, gaussian(1, 4096).iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    drop_in(tmp.path(), Plugin::Rtn, "librtn.so");
    let foreign = ["/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/x86_64-linux-gnu/libz.so.1", "/lib64/libz.so.1"]
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .map(|libz| {
            let copy = tmp.path().join("libz.so");
            std::fs::copy(libz, &copy).unwrap();
            copy
        });

    let registry = load_folder(tmp.path()).unwrap();
    assert!(registry.get("rtn").is_ok(), "a broken neighbour must not stop rtn from loading");
    let reason = broken_reason(&registry, &noise);
    assert!(reason.contains("cannot be opened as a shared library"), "{reason}");
    if let Some(foreign) = foreign {
        let reason = broken_reason(&registry, &foreign);
        assert!(reason.contains("not a kvant plugin"), "{reason}");
    }
}

#[test]
fn plugin_of_another_contract_is_refused_naming_both_versions() {
    let tmp = TempDir::new().unwrap();
    let old = drop_in(tmp.path(), Plugin::OldContract, "libold.so");
    let registry = load_folder(tmp.path()).unwrap();
    assert_eq!(registry.methods().count(), 0);
    let major = CONTRACT_VERSION.split('.').next().unwrap();
    for reason in [broken_reason(&registry, &old).to_string(), open_plugin(&old, 1).err().unwrap()] {
        assert!(reason.contains("plugin contract 2.0.0"), "{reason}");
        assert!(reason.contains(&format!("needs contract {major}.x")) && reason.contains(CONTRACT_VERSION), "{reason}");
    }
}

#[test]
fn two_libraries_declaring_one_method_name_is_an_error_naming_both() {
    let tmp = TempDir::new().unwrap();
    let rtn = drop_in(tmp.path(), Plugin::Rtn, "librtn.so");
    let dup = drop_in(tmp.path(), Plugin::DupRtn, "libdup.so");
    let error = load_folder(tmp.path()).err().expect("a name conflict must not load").to_string();
    assert!(error.contains("`rtn`"), "{error}");
    assert!(error.contains(&rtn.display().to_string()) && error.contains(&dup.display().to_string()), "{error}");
}

// -------------------------------------------------------------------- misbehaving plugins

#[test]
fn a_panic_in_quantize_is_an_error_and_the_host_keeps_running() {
    let methods = open_plugin(&Plugin::Panicky.library(), 2).unwrap();
    let method = methods.iter().find(|m| m.info().name == "panic-quantize").unwrap();
    let config = method.validate_config(&Map::new()).unwrap();
    let skeleton = Skeleton {
        model_type: "llama".into(),
        config: json!({}),
        modules: vec![Module {
            name: "proj".into(),
            kind: ModuleKind::Linear,
            tensors: vec![kvant_plugin_api::TensorSpec::new("weight", DType::F32, [4, 8])],
            not_converted: None,
        }],
    };
    let plan = method.plan(&skeleton, &config).unwrap();
    let values = gaussian(3, 32);
    let weight = TensorView { name: "weight", dtype: DType::F32, shape: &[4, 8], data: bytemuck::cast_slice(&values) };
    for _ in 0..2 {
        let error = method.quantize(&plan.modules[0], &[weight], None, &config).err().unwrap().to_string();
        assert!(error.contains("panic-quantize") && error.contains("panicked in quantize"), "{error}");
        assert!(error.contains("panics in quantize on purpose"), "the panic message is passed on: {error}");
    }
    // The plugin still answers after panicking.
    assert_eq!(method.plan(&skeleton, &config).unwrap(), plan);

    // Through the whole lifecycle: an error, and no output folder.
    let tmp = TempDir::new().unwrap();
    let model = tmp.path().join("model");
    write_llama(&model, DType::F32, 10);
    let registry = load_registry(&registry_for(tmp.path(), &[("panic-quantize", Plugin::Panicky)])).unwrap();
    let out = tmp.path().join("out");
    let error =
        lifecycle::quantize(&registry, &quantize_request(&model, "panic-quantize", json!({}), &out)).err().unwrap();
    assert!(format!("{error:#}").contains("panicked in quantize"), "{error:#}");
    assert!(!out.exists(), "a failed quantization must leave no output");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 2, "nothing but the model and registry.toml remains");
}

#[test]
fn tensors_that_break_the_plan_are_refused() {
    let tmp = TempDir::new().unwrap();
    let model = tmp.path().join("model");
    write_llama(&model, DType::BF16, 20);
    let registry = load_registry(&registry_for(tmp.path(), &[("bad-shape", Plugin::BadOutput)])).unwrap();
    for (method, expected) in [("bad-shape", "but the plan announced F32 ["), ("bad-nan", "NaN")] {
        let out = tmp.path().join(method);
        let error = lifecycle::quantize(&registry, &quantize_request(&model, method, json!({}), &out)).err().unwrap();
        let message = format!("{error:#}");
        assert!(message.contains(&format!("method `{method}` returned bad tensors")), "{message}");
        assert!(message.contains(expected), "{message}");
        assert!(!out.exists(), "refused output must not be written");
    }
}

// ------------------------------------------------------------------------------ end to end

/// Largest relative error expected from rtn at each bit width on Gaussian weights.
fn rtn_bound(bits: i64) -> f64 {
    match bits {
        8 => 0.01,
        4 => 0.15,
        3 => 0.3,
        _ => 0.8,
    }
}

#[test]
fn rtn_quantize_then_dequantize_reproduces_small_checkpoints() {
    let tmp = TempDir::new().unwrap();
    let registry = load_registry(&registry_for(tmp.path(), &[("rtn", Plugin::Rtn)])).unwrap();
    let settings = [
        (DType::F32, json!({})),
        (DType::BF16, json!({"bits": 8, "group_size": -1, "sym": true})),
        (DType::F16, json!({"bits": 3, "group_size": 32})),
        (DType::F32, json!({"bits": 2, "group_size": 64, "sym": true})),
        (DType::F32, json!({"bits": 5, "group_size": 48})),
    ];
    for (i, (dtype, options)) in settings.into_iter().enumerate() {
        let case = format!("{dtype} {options}");
        let model = tmp.path().join(format!("model-{i}"));
        let (quantized, dense) = (tmp.path().join(format!("q-{i}")), tmp.path().join(format!("dq-{i}")));
        let original = write_llama(&model, dtype, 100 * i as u64);
        let report = lifecycle::quantize(&registry, &quantize_request(&model, "rtn", options.clone(), &quantized))
            .unwrap_or_else(|e| panic!("{case}: {e:#}"));
        let bits = report.config["bits"].as_i64().unwrap();
        assert_eq!(report.modules.len(), LLAMA_LINEARS.len(), "{case}");
        assert!(report.not_converted.iter().any(|(m, _)| m == "lm_head"), "{case}: the head stays dense");

        let qc = Checkpoint::open(&quantized).unwrap().quantization_config().cloned().unwrap();
        assert_eq!(qc["quant_method"], "rtn", "{case}");
        assert_eq!(qc["bits"], bits, "{case}");

        let modules = lifecycle::dequantize(&registry, &quantized, &dense, DType::F32, false, false).unwrap();
        assert_eq!(modules, LLAMA_LINEARS.len(), "{case}");
        let back = Checkpoint::open(&dense).unwrap();
        assert_eq!(back.len(), original.len(), "{case}");
        for tensor in &original {
            let restored = back.view(&tensor.name).unwrap();
            assert_eq!(restored.dtype, DType::F32, "{case}");
            assert_eq!(restored.shape, &tensor.shape[..], "{case}: {}", tensor.name);
            let (got, want) = (restored.to_f32(), tensor.view().to_f32());
            let is_quantized_weight = LLAMA_LINEARS.iter().any(|(m, ..)| tensor.name == format!("{m}.weight"));
            if is_quantized_weight {
                let error = relative_error(&got, &want);
                assert!(error > 0.0 && error <= rtn_bound(bits), "{case}: {} error {error}", tensor.name);
            } else {
                assert_eq!(got, want, "{case}: {} is not quantized and must come back exactly", tensor.name);
            }
        }
    }
}

// ----------------------------------------------------------------------------- conformance

#[test]
fn conformance_suite_passes_rtn_and_catches_faulty_plugins() {
    let report = check_library(&Plugin::Rtn.library(), 2).unwrap();
    assert_eq!(report.methods, ["rtn"]);
    let failures: Vec<String> = report.failures().map(|c| c.to_string()).collect();
    assert!(failures.is_empty(), "{failures:#?}");
    let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
    for expected in
        ["flags consistent", "defaults valid", "out-of-range values rejected", "round trip 96x576 BF16 +bias"]
    {
        assert!(names.contains(&expected), "no `{expected}` in {names:?}");
    }

    let report = check_library(&Plugin::BadOutput.library(), 2).unwrap();
    let failed = |method: &str| -> Vec<String> {
        report.failures().filter(|c| c.method == method).map(|c| c.to_string()).collect()
    };
    // Every round trip fails, for the reason the host refuses the output; option checks pass.
    let shape = failed("bad-shape");
    assert_eq!(shape.len(), 12, "{shape:#?}");
    assert!(shape.iter().all(|f| f.contains("round trip") && f.contains("but the plan announced")), "{shape:#?}");
    let nan = failed("bad-nan");
    assert_eq!(nan.len(), 12, "{nan:#?}");
    assert!(nan.iter().all(|f| f.contains("NaN")), "{nan:#?}");

    let report = check_library(&Plugin::Panicky.library(), 2).unwrap();
    for method in ["panic-quantize", "panic-dequantize"] {
        let panics: Vec<&str> = report
            .failures()
            .filter(|c| c.method == method)
            .map(|c| c.outcome.as_ref().unwrap_err().as_str())
            .collect();
        assert!(!panics.is_empty() && panics.iter().all(|r| r.contains("panicked")), "{method}: {panics:?}");
    }

    assert!(check_library(&Plugin::OldContract.library(), 1).err().unwrap().contains("2.0.0"));
}

// ------------------------------------------------------------------------------------- CLI

#[test]
fn cli_exit_codes_are_0_ok_1_failure_2_usage() {
    let tmp = TempDir::new().unwrap();
    let registry = registry_for(tmp.path(), &[("rtn", Plugin::Rtn), ("bad-shape", Plugin::BadOutput)]);
    let registry = registry.to_str().unwrap();
    let model = tmp.path().join("model");
    write_llama(&model, DType::F32, 7);
    let model = model.to_str().unwrap();
    let path = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let (out, bad_out, dense) = (path("out"), path("bad-out"), path("dense"));

    let run = |args: &[&str]| {
        let output = kvant(&[&["--registry", registry, "-q"], args].concat());
        (output.status.code(), text(&output.stdout), text(&output.stderr))
    };

    let (code, stdout, stderr) = run(&["list"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("rtn") && stdout.contains("bad-shape"), "{stdout}");

    let (code, _, stderr) = run(&["quantize", model, "--method", "rtn", "--set", "bits=8", "-o", &out]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(Path::new(&out).join("config.json").is_file());

    let (code, _, stderr) = run(&["dequantize", &out, "-o", &dense]);
    assert_eq!(code, Some(0), "{stderr}");

    let (code, _, stderr) = run(&["quantize", model, "--method", "rtn", "-o", &out]);
    assert_eq!(code, Some(1), "an existing output without --force is a failure: {stderr}");
    assert!(stderr.contains("--force"), "{stderr}");

    let (code, _, stderr) = run(&["quantize", model, "--method", "bad-shape", "-o", &bad_out]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("plan announced") && !Path::new(&bad_out).exists(), "{stderr}");

    let (code, _, stderr) =
        run(&["quantize", model, "--method", "rtn", "--set", "bits=99", "--set", "colour=red", "-o", &bad_out]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("`bits`") && stderr.contains("`colour`"), "every bad option is reported: {stderr}");

    let (code, _, stderr) = run(&["quantize", model, "--method", "no-such-method", "-o", &bad_out]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no method named `no-such-method`"), "{stderr}");

    let (code, _, _) = run(&["frobnicate"]);
    assert_eq!(code, Some(2));

    let (code, _, stderr) = run(&["quantize", &path("missing-model"), "--method", "rtn", "-o", &bad_out]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(!Path::new(&bad_out).exists());
}

#[test]
fn cli_plugin_check_passes_rtn_and_fails_bad_output() {
    let output = kvant(&["plugin", "check", Plugin::Rtn.library().to_str().unwrap()]);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}{}", text(&output.stderr));
    assert!(stdout.contains("PASS rtn round trip 33x70 F16"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");

    let output = kvant(&["plugin", "check", Plugin::BadOutput.library().to_str().unwrap()]);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("FAIL bad-shape round trip 64x64 F32: quantize:"), "{stdout}");
    assert!(stdout.contains("PASS bad-shape defaults valid"), "{stdout}");
    assert!(stderr.contains("checks failed"), "{stderr}");

    let output = kvant(&["plugin", "check", Plugin::OldContract.library().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("plugin contract 2.0.0"), "{}", text(&output.stderr));
}
