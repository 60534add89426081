//! GGUF to Hugging Face: `kvant dequantize MODEL.gguf -o DIR`.
//!
//! The container is read by [`crate::gguf`]; block types are expanded by the `gguf` plugin (GGUF
//! is a pre-quantized method in transformers too, dequantized on load); llama.cpp's Q/K row
//! permutation is undone, `config.json` is rebuilt from the metadata, and so is the tokenizer.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use kvant_plugin_api::tensor::from_f32;
use kvant_plugin_api::{DType, ModulePlan, TensorSpec, TensorView};
use serde_json::{json, Map};

use crate::checkpoint::{CheckpointWriter, WriterOptions};
use crate::gguf::{hf_tensor_name, unpermute_qk, GgufFile};
use crate::lifecycle::validate_options;
use crate::progress::Bar;
use crate::registry::Registry;

/// What an import wrote.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// Tensors written.
    pub tensors: usize,
    /// GGUF tensors without a Hugging Face counterpart, skipped.
    pub skipped: Vec<String>,
    /// True when `tokenizer.json` was rebuilt from the metadata.
    pub tokenizer: bool,
}

/// True when `path` is a file with GGUF's magic or a `.gguf` name: a damaged `.gguf` file then
/// gets the GGUF reader's diagnosis instead of being read as a safetensors file.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let named = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    path.is_file()
        && (named || std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF")
}

/// Writes a Hugging Face folder with dense `dtype` weights from a GGUF file.
pub fn import_gguf(registry: &Registry, path: &Path, out: &Path, dtype: DType, force: bool, progress: bool) -> Result<ImportReport> {
    let gguf = GgufFile::open(path)?;
    let method = &registry
        .get("gguf")
        .context("reading GGUF block types needs the `gguf` plugin (plugins/gguf, listed in registry.toml)")?
        .client;
    let config = validate_options(method, &Map::new())?;
    let hf_config = gguf.hf_config()?;

    let mut specs = Vec::new();
    let mut skipped = Vec::new();
    for t in gguf.tensors() {
        match hf_tensor_name(&t.name) {
            Some(name) => specs.push(TensorSpec::new(name, dtype, t.shape())),
            None => skipped.push(t.name.clone()),
        }
    }
    if specs.is_empty() {
        bail!("{}: no tensor has a Hugging Face name (is it a Llama-family model?)", path.display());
    }
    let options = WriterOptions { force, protected_paths: vec![path.to_path_buf()], ..Default::default() };
    let writer = CheckpointWriter::create(out, specs.clone(), options)?;

    let bar = Bar::new(specs.len() as u64, "import", progress);
    for t in gguf.tensors() {
        let Some(name) = hf_tensor_name(&t.name) else { continue };
        bar.step(&name);
        let shape = t.shape();
        let numel: usize = shape.iter().product();
        let data = gguf.tensor_data(t);
        let packed = [TensorView { name: "weight", dtype: DType::U8, shape: &[data.len()], data }];
        let plan = ModulePlan {
            name: t.name.clone(),
            shape: (shape.first().copied().unwrap_or(1), shape.iter().skip(1).product()),
            tensors: vec![],
            attrs: json!({"ggml_type": t.ggml_type, "n_elements": numel}),
        };
        let mut values = method
            .dequantize(&plan, &packed, &config)
            .map_err(|e| anyhow!("{}: tensor `{}`: {e}", path.display(), t.name))?;
        if values.len() != numel {
            bail!("{}: tensor `{}` expanded to {} values, expected {numel}", path.display(), t.name, values.len());
        }
        if let Some(heads) = gguf.qk_permutation_heads(&name)? {
            let rows = shape[0];
            values = unpermute_qk(&values, rows, numel / rows, heads)
                .with_context(|| format!("{}: un-permuting `{}`", path.display(), t.name))?;
        }
        writer.write(&name, &from_f32(dtype, &values))?;
    }
    drop(bar);

    let mut config_json = hf_config;
    config_json["torch_dtype"] = dtype.torch_name().into();
    let (tokenizer_files, staging) = tokenizer_files(&gguf, out)?;
    let result = writer.finish(&config_json, &tokenizer_files);
    if let Some(dir) = staging {
        let _ = std::fs::remove_dir_all(dir);
    }
    result?;
    Ok(ImportReport { tensors: specs.len(), skipped, tokenizer: !tokenizer_files.is_empty() })
}

/// Rebuilds the tokenizer files into a staging folder beside `out`, for the writer to copy.
fn tokenizer_files(gguf: &GgufFile, out: &Path) -> Result<(Vec<PathBuf>, Option<PathBuf>)> {
    let files = match crate::gguf_tokenizer::build(gguf) {
        Ok(files) => files,
        Err(e) => {
            log::warn!("{}: no tokenizer written: {e:#}", gguf.path().display());
            return Ok((Vec::new(), None));
        }
    };
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let staging = parent.join(format!(".kvant-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    files.write_to(&staging)?;
    let paths = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"].map(|f| staging.join(f));
    Ok((paths.to_vec(), Some(staging)))
}
