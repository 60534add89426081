//! Helpers shared by the plugin integration tests: building plugin libraries, writing registries
//! and small checkpoints, running the `kvant` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use kvant::checkpoint::save_dense;
use kvant::conformance::gaussian;
use kvant::registry::{Registry, Sources};
use kvant_plugin_api::tensor::from_f32;
use kvant_plugin_api::{DType, Tensor};
use serde_json::json;

/// A plugin library the tests load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plugin {
    /// The reference `rtn` plugin of the workspace.
    Rtn,
    /// `panic-quantize` and `panic-dequantize`: panic inside one hook each.
    Panicky,
    /// `bad-shape` and `bad-nan`: quantize returns a wrongly shaped tensor, or NaN.
    BadOutput,
    /// A root module named like kvant's but of contract 2.0.0.
    OldContract,
    /// A second library declaring a method named `rtn`.
    DupRtn,
    /// `slow`: quantize hangs on `down_proj` modules.
    Slow,
    /// The bitsandbytes plugin of the workspace (`bnb-nf4`, `bnb-fp4`, `bnb-int8`).
    Bnb,
}

impl Plugin {
    const ALL: [Plugin; 7] =
        [Plugin::Rtn, Plugin::Panicky, Plugin::BadOutput, Plugin::OldContract, Plugin::DupRtn, Plugin::Slow, Plugin::Bnb];

    /// The library's crate name, as in its file name.
    fn lib_name(self) -> &'static str {
        match self {
            Plugin::Rtn => "kvant_rtn",
            Plugin::Panicky => "fixture_panicky",
            Plugin::BadOutput => "fixture_bad_output",
            Plugin::OldContract => "fixture_old_contract",
            Plugin::DupRtn => "fixture_dup_rtn",
            Plugin::Slow => "fixture_slow",
            Plugin::Bnb => "kvant_bnb",
        }
    }

    /// What selects the crate on `cargo build`'s command line, from the repository root.
    fn cargo_selector(self) -> Vec<&'static str> {
        match self {
            Plugin::Rtn => vec!["-p", "kvant-rtn"],
            Plugin::Panicky => vec!["--manifest-path", "tests/fixtures/plugins/panicky/Cargo.toml"],
            Plugin::BadOutput => vec!["--manifest-path", "tests/fixtures/plugins/bad-output/Cargo.toml"],
            Plugin::OldContract => vec!["--manifest-path", "tests/fixtures/plugins/old-contract/Cargo.toml"],
            Plugin::DupRtn => vec!["--manifest-path", "tests/fixtures/plugins/dup-rtn/Cargo.toml"],
            Plugin::Slow => vec!["--manifest-path", "tests/fixtures/plugins/slow/Cargo.toml"],
            Plugin::Bnb => vec!["-p", "kvant-bnb"],
        }
    }

    /// The library file, built with the others on first use (once per test binary).
    pub fn library(self) -> PathBuf {
        static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        let dir = BUILT.get_or_init(build_all).as_ref().unwrap_or_else(|e| panic!("{e}"));
        let (prefix, suffix) = (std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
        dir.join(format!("{prefix}{}{suffix}", self.lib_name()))
    }
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("host/ is inside the repository").to_path_buf()
}

/// Builds every test plugin in release mode into `target/test-plugins`: a target folder of its
/// own, because the `cargo test` running us holds the lock on the usual one.
fn build_all() -> Result<PathBuf, String> {
    let target = repo_root().join("target").join("test-plugins");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for plugin in Plugin::ALL {
        let output = Command::new(&cargo)
            .current_dir(repo_root())
            .args(["build", "--release", "--quiet", "--target-dir"])
            .arg(&target)
            .args(plugin.cargo_selector())
            .output()
            .map_err(|e| format!("cannot run {cargo}: {e}"))?;
        if !output.status.success() {
            return Err(format!("building {plugin:?} failed:\n{}", String::from_utf8_lossy(&output.stderr)));
        }
    }
    Ok(target.join("release"))
}

/// A TOML string holding `path`.
pub fn toml_path(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}

/// Writes `body` as `dir/registry.toml` and returns its path.
pub fn write_registry(dir: &Path, body: &str) -> PathBuf {
    let file = dir.join("registry.toml");
    std::fs::write(&file, body).unwrap();
    file
}

/// A registry.toml naming each plugin's library by absolute path, under `[methods.NAME]`.
pub fn registry_for(dir: &Path, methods: &[(&str, Plugin)]) -> PathBuf {
    let body: String = methods
        .iter()
        .map(|(name, plugin)| format!("[methods.{name}]\nlibrary = {}\n\n", toml_path(&plugin.library())))
        .collect();
    write_registry(dir, &body)
}

/// Loads a registry from a registry file only.
pub fn load_registry(file: &Path) -> anyhow::Result<Registry> {
    Registry::load(&Sources {
        registry_file: Some(file.to_path_buf()),
        plugins_dir: None,
        threads: 2,
        allow_insecure: false,
    })
}

/// Loads a registry from a drop-in folder only.
pub fn load_folder(dir: &Path) -> anyhow::Result<Registry> {
    Registry::load(&Sources {
        registry_file: None,
        plugins_dir: Some(dir.to_path_buf()),
        threads: 2,
        allow_insecure: false,
    })
}

/// Copies `plugin`'s library into `dir` as `file_name`, the way a user drops one in.
pub fn drop_in(dir: &Path, plugin: Plugin, file_name: &str) -> PathBuf {
    let path = dir.join(file_name);
    std::fs::copy(plugin.library(), &path).unwrap();
    path
}

/// The Linear modules of [`write_llama`]'s model, with their `(out, in)` shapes and bias.
pub const LLAMA_LINEARS: [(&str, (usize, usize), bool); 4] = [
    ("model.layers.0.self_attn.q_proj", (64, 64), true),
    ("model.layers.0.self_attn.o_proj", (64, 64), false),
    ("model.layers.0.mlp.up_proj", (160, 64), false),
    // 160 inputs: groups of 128 leave a short last group of 32.
    ("model.layers.0.mlp.down_proj", (64, 160), false),
];

/// Writes a one-layer llama-style checkpoint in `dtype` to `dir` (Gaussian weights from `seed`)
/// and returns its tensors.
pub fn write_llama(dir: &Path, dtype: DType, seed: u64) -> Vec<Tensor> {
    let vocab = 48;
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![vocab, 64])];
    for (name, (out, inp), bias) in LLAMA_LINEARS {
        shapes.push((format!("{name}.weight"), vec![out, inp]));
        if bias {
            shapes.push((format!("{name}.bias"), vec![out]));
        }
    }
    shapes.push(("model.layers.0.input_layernorm.weight".into(), vec![64]));
    shapes.push(("model.norm.weight".into(), vec![64]));
    shapes.push(("lm_head.weight".into(), vec![vocab, 64]));
    let tensors: Vec<Tensor> = shapes
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let values = gaussian(seed + i as u64, shape.iter().product());
            Tensor { name, dtype, shape, data: from_f32(dtype, &values) }
        })
        .collect();
    let config = json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        "intermediate_size": 160, "num_hidden_layers": 1, "vocab_size": vocab, "tie_word_embeddings": false,
    });
    save_dense(dir, &tensors, &config).unwrap();
    tensors
}

/// Runs the `kvant` binary with `args`.
pub fn kvant(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvant"))
        .args(args)
        .env_remove("KVANT_REGISTRY")
        .env_remove("KVANT_PLUGINS_DIR")
        .output()
        .unwrap()
}

/// The text of an output stream.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Copies a folder tree (a plugin crate's sources) into `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The real SmolLM2 F32 folder (`$KVANT_TEST_HF_MODEL`, else `<cache>/smollm2-f32`) and the text
/// `<cache>/{text}`, the cache being `$KVANT_CACHE`, else `<repo>/.cache/kvant` (filled by
/// `scripts/fetch-test-material.sh` and `scripts/test.sh`); `None`, saying what is missing, when
/// either is absent.
pub fn real_model_and_text(text: &str) -> Option<(PathBuf, PathBuf)> {
    let cache = std::env::var_os("KVANT_CACHE").map_or_else(|| repo_root().join(".cache/kvant"), PathBuf::from);
    let model = std::env::var_os("KVANT_TEST_HF_MODEL").map_or_else(|| cache.join("smollm2-f32"), PathBuf::from);
    let text = cache.join(text);
    for needed in [model.join("model.safetensors"), model.join("tokenizer.json"), text.clone()] {
        if !needed.is_file() {
            eprintln!("skipping: {} is missing (see this test's header)", needed.display());
            return None;
        }
    }
    Some((model, text))
}
