//! The compatibility policy (README) against plugins built from other copies of plugin-api:
//! a newer minor contract that appended a root-module field loads and works; a plugin built
//! against contract 1.1 (plugin-api and the template as of the last 1.1 commit) loads and passes
//! `kvant plugin check` in this 1.2 host; a plugin whose types differ from the version it
//! declares is refused, saying so. (Another major is refused too: plugins.rs, fixture
//! old-contract.)
//!
//! Not covered: contract 1.0. Its plugins (plugin-api before `quantize_group`) are refused with
//! both versions and the remedy: abi_stable accepts a library whose prefix types have at least
//! the loader's fields, never fewer, so the method vtable with one entry fewer would fail its
//! layout check ("too many fields").

#[allow(dead_code)]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{copy_dir, repo_root, text};
use tempfile::TempDir;

fn replace(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains(from), "{} no longer contains {from:?}", file.display());
    std::fs::write(file, text.replace(from, to)).unwrap();
}

/// The last commit of contract 1.1 (before 1.2 added JSON fields with defaults).
const CONTRACT_1_1_COMMIT: &str = "fd07d9cbaa3b809d097ca81fa6558d11e9152526";

/// Builds plugins/template against a copy of plugin-api edited by `edit` (given the copy's
/// `src`), in `dir`; returns the library, moved into `dir/plugins.d`.
fn template_against_edited_api(dir: &Path, crate_name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    template_from(&repo_root(), dir, crate_name, edit)
}

/// [`template_against_edited_api`] with plugin-api's and the template's sources taken from
/// `sources` (a repository checkout or an extracted commit).
fn template_from(sources: &Path, dir: &Path, crate_name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let api = dir.join("plugin-api");
    copy_dir(&sources.join("plugin-api/src"), &api.join("src"));
    // The workspace's inherited keys, spelled out for a crate of its own.
    let manifest = std::fs::read_to_string(repo_root().join("plugin-api/Cargo.toml")).unwrap();
    let root = std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let root: toml::Table = toml::from_str(&root).unwrap();
    let mut manifest: toml::Table = toml::from_str(&manifest).unwrap();
    let package = manifest["package"].as_table_mut().unwrap();
    for key in ["version", "edition", "license"] {
        package.insert(key.into(), root["workspace"]["package"][key].clone());
    }
    package.remove("rust-version");
    for (name, dep) in manifest["dependencies"].as_table_mut().unwrap().iter_mut() {
        if dep.get("workspace").is_some() {
            *dep = root["workspace"]["dependencies"][name.as_str()].clone();
        }
    }
    manifest.insert("workspace".into(), toml::Value::Table(Default::default()));
    std::fs::write(api.join("Cargo.toml"), toml::to_string(&manifest).unwrap()).unwrap();
    edit(&api.join("src"));

    let plugin = dir.join(crate_name);
    copy_dir(&sources.join("plugins/template/src"), &plugin.join("src"));
    let manifest = std::fs::read_to_string(repo_root().join("plugins/template/Cargo.toml"))
        .unwrap()
        .replace("name = \"kvant-template\"", &format!("name = \"{crate_name}\""))
        .replace("path = \"../../plugin-api\"", &format!("path = {}", common::toml_path(&api)))
        + "\n[workspace]\n";
    std::fs::write(plugin.join("Cargo.toml"), manifest).unwrap();
    std::fs::copy(repo_root().join("Cargo.lock"), plugin.join("Cargo.lock")).unwrap();
    let target = repo_root().join("target/method-kit");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .current_dir(&plugin)
        .args(["build", "--release", "--offline", "--quiet", "--target-dir"])
        .arg(&target)
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", text(&built.stderr));
    let file = format!("{}{}{}", std::env::consts::DLL_PREFIX, crate_name.replace('-', "_"), std::env::consts::DLL_SUFFIX);
    let plugins = dir.join("plugins.d");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(target.join("release").join(&file), plugins.join(&file)).unwrap();
    plugins.join(file)
}

/// `kvant list` with only `plugins` as a source (an empty registry).
fn list(plugins: &Path) -> String {
    let registry = common::write_registry(plugins.parent().unwrap(), "");
    let out = Command::new(env!("CARGO_BIN_EXE_kvant"))
        .arg("--registry")
        .arg(registry)
        .arg("--plugins-dir")
        .arg(plugins)
        .arg("list")
        .env_remove("KVANT_REGISTRY")
        .env_remove("KVANT_PLUGINS_DIR")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn a_newer_minor_with_an_appended_root_field_loads_and_runs() {
    let tmp = TempDir::new().unwrap();
    let lib = template_against_edited_api(tmp.path(), "newer-minor", |src| {
        replace(&src.join("lib.rs"), "pub const CONTRACT_VERSION: &str = \"1.", "pub const CONTRACT_VERSION: &str = \"1.99");
        let ffi = src.join("ffi.rs");
        replace(
            &ffi,
            "    pub methods: extern \"C\" fn() -> RResult<RVec<FfiMethodBox>, RString>,\n}",
            "    pub methods: extern \"C\" fn() -> RResult<RVec<FfiMethodBox>, RString>,\n    /// A later minor's addition.\n    pub added_later: u64,\n}",
        );
        replace(&ffi, "init: init_plugin, methods };", "init: init_plugin, methods, added_later: 7 };");
    });
    let listed = list(lib.parent().unwrap());
    assert!(listed.contains(&format!("from drop-in: {}", lib.display())), "{listed}");
    assert!(listed.contains("absmax-int8") && !listed.contains("BROKEN"), "{listed}");
}

#[test]
fn a_plugin_built_against_contract_1_1_loads_and_passes_the_check() {
    let tmp = TempDir::new().unwrap();
    let old = tmp.path().join("repo-1.1");
    std::fs::create_dir_all(&old).unwrap();
    let archive = Command::new("git")
        .current_dir(repo_root())
        .args(["archive", "--format=tar", CONTRACT_1_1_COMMIT, "plugin-api/src", "plugins/template/src"])
        .output()
        .unwrap();
    assert!(archive.status.success(), "git archive {CONTRACT_1_1_COMMIT}: {}", text(&archive.stderr));
    let mut tar = Command::new("tar").current_dir(&old).arg("-x").stdin(std::process::Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(tar.stdin.as_mut().unwrap(), &archive.stdout).unwrap();
    assert!(tar.wait().unwrap().success());
    let lib_rs = std::fs::read_to_string(old.join("plugin-api/src/lib.rs")).unwrap();
    assert!(lib_rs.contains("pub const CONTRACT_VERSION: &str = \"1.1.0\";"), "{CONTRACT_1_1_COMMIT} is not contract 1.1.0");

    let lib = template_from(&old, tmp.path(), "contract-one-one", |_| {});
    let listed = list(lib.parent().unwrap());
    assert!(listed.contains("absmax-int8") && !listed.contains("BROKEN"), "{listed}");
    // Its MethodInfo has no forward_tolerance: the default applies.
    let check = Command::new(env!("CARGO_BIN_EXE_kvant")).args(["plugin", "check"]).arg(&lib).output().unwrap();
    assert!(check.status.success(), "{}{}", text(&check.stdout), text(&check.stderr));
    assert!(text(&check.stdout).contains("<= 1e-3"), "{}", text(&check.stdout));
}

#[test]
fn types_that_do_not_match_the_declared_version_are_refused_saying_so() {
    let tmp = TempDir::new().unwrap();
    let lib = template_against_edited_api(tmp.path(), "modified-api", |src| {
        replace(&src.join("ffi.rs"), "    pub threads: u32,", "    pub threads: u64,");
    });
    let listed = list(lib.parent().unwrap());
    let line = listed.lines().find(|l| l.starts_with("BROKEN") && l.contains(&lib.display().to_string()));
    let line = line.unwrap_or_else(|| panic!("{} is not listed broken:\n{listed}", lib.display()));
    assert!(line.contains("types do not match") && line.contains("modified plugin-api"), "{line}");
}
