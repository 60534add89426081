//! The method-author kit as an outsider uses it: plugins/template copied to a folder outside the
//! workspace, built there with its own Cargo.toml against kvant-plugin-api by path, dropped into
//! a plugins folder, and used by the already-built `kvant` (list, plugin check, quantize).

#[allow(dead_code)]
mod common;

use std::path::Path;
use std::process::Command;

use common::{copy_dir, repo_root, text, write_llama};
use kvant_plugin_api::DType;
use tempfile::TempDir;

/// Runs the installed `kvant` with only the drop-in folder: an empty registry of its own keeps the
/// repository's registry.toml (which lists the template too) out of the way.
fn kvant(plugins: &Path, args: &[&str]) -> std::process::Output {
    let registry = plugins.parent().unwrap().join("registry.toml");
    std::fs::write(&registry, "").unwrap();
    Command::new(env!("CARGO_BIN_EXE_kvant"))
        .arg("--registry")
        .arg(&registry)
        .arg("--plugins-dir")
        .arg(plugins)
        .args(args)
        .env_remove("KVANT_REGISTRY")
        .env_remove("KVANT_PLUGINS_DIR")
        .output()
        .unwrap()
}

#[test]
fn template_copied_outside_the_workspace_builds_and_runs_in_the_installed_host() {
    let tmp = TempDir::new().unwrap();
    let host = Path::new(env!("CARGO_BIN_EXE_kvant"));
    let host_before = std::fs::read(host).unwrap();

    // An author's crate: the template's sources, its own manifest, its own workspace.
    let crate_dir = tmp.path().join("my-method");
    copy_dir(&repo_root().join("plugins/template/src"), &crate_dir.join("src"));
    let manifest = std::fs::read_to_string(repo_root().join("plugins/template/Cargo.toml")).unwrap();
    let api = repo_root().join("plugin-api");
    let manifest = manifest
        .replace("name = \"kvant-template\"", "name = \"my-method\"")
        .replace("path = \"../../plugin-api\"", &format!("path = {}", common::toml_path(&api)))
        + "\n[workspace]\n";
    assert!(manifest.contains(&api.display().to_string()), "the template's manifest changed shape:\n{manifest}");
    std::fs::write(crate_dir.join("Cargo.toml"), manifest).unwrap();
    // The workspace's lock file pins the same dependency versions, so no registry is needed.
    std::fs::copy(repo_root().join("Cargo.lock"), crate_dir.join("Cargo.lock")).unwrap();

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .current_dir(&crate_dir)
        .args(["build", "--release", "--offline", "--quiet", "--target-dir"])
        .arg(repo_root().join("target/method-kit"))
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", text(&built.stderr));
    let lib_name = format!("{}my_method{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    let plugins = tmp.path().join("plugins.d");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::copy(repo_root().join("target/method-kit/release").join(&lib_name), plugins.join(&lib_name)).unwrap();
    let lib = plugins.join(&lib_name);

    let list = kvant(&plugins, &["list"]);
    let listed = text(&list.stdout);
    assert!(list.status.success(), "{}", text(&list.stderr));
    assert!(listed.contains("absmax-int8") && listed.contains(&format!("drop-in: {}", lib.display())), "{listed}");

    let check = kvant(&plugins, &["plugin", "check", lib.to_str().unwrap()]);
    let report = text(&check.stdout);
    assert!(check.status.success(), "{report}{}", text(&check.stderr));
    assert!(report.contains("1 method(s): absmax-int8") && report.contains("checks passed"), "{report}");

    let model = tmp.path().join("model");
    write_llama(&model, DType::F32, 5);
    let out = tmp.path().join("out");
    let run = kvant(&plugins, &["quantize", model.to_str().unwrap(), "--method", "absmax-int8", "-o", out.to_str().unwrap(), "--json"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let modules = summary["quantization"]["modules"].as_array().unwrap();
    assert_eq!(modules.len(), common::LLAMA_LINEARS.len());
    // Int8 per row: every module's relative error well under the declared tolerance.
    assert!(modules.iter().all(|m| m["relative_error"].as_f64().unwrap() < 0.02), "{modules:?}");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["quant_method"], "absmax-int8");

    assert!(std::fs::read(host).unwrap() == host_before, "the host binary was rebuilt");
}
