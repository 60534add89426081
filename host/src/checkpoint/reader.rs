//! Reading a Hugging Face checkpoint: memory-mapped safetensors shards, `config.json` and the
//! side files (tokenizer, generation config...) that a saved model carries along.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use kvant_plugin_api::{TensorSpec, TensorView};
use memmap2::Mmap;
use serde_json::Value;

use super::header::{self, HeaderTensor};
use super::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};

/// Files that belong to a model without being weights or its config; a quantized copy needs them
/// to be usable (tokenizer, chat template, generation defaults, license, remote code).
const COMPANION_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "LICENSE",
    "LICENSE.txt",
    "LICENSE.md",
    "NOTICE",
];

/// Prefixes of Python files that `trust_remote_code` models load through `auto_map`.
const REMOTE_CODE_PREFIXES: &[&str] = &["configuration_", "modeling_", "tokenization_"];

/// One memory-mapped safetensors file.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
}

/// Where one tensor's bytes are.
struct Entry {
    spec: TensorSpec,
    shard: usize,
    begin: usize,
    end: usize,
}

/// The tensors of one module, e.g. `model.layers.0.mlp.down_proj` with its `weight` and `bias`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleTensors<'a> {
    /// Module path, e.g. `model.layers.0.mlp.down_proj` (empty for top-level tensors).
    pub prefix: &'a str,
    /// Full names of the module's tensors, in storage order.
    pub tensors: Vec<&'a str>,
}

/// Splits a full tensor name into its module path and its name within the module.
///
/// The split is before the last `weight` or `bias` component, so that quantized companions stay
/// with their module (`q_proj.weight.absmax` gives `("q_proj", "weight.absmax")`); names without
/// such a component split at their last dot (`q_proj.qweight` gives `("q_proj", "qweight")`).
pub fn split_module_name(full_name: &str) -> (&str, &str) {
    let mut split_at = None;
    let mut start = 0;
    for component in full_name.split('.') {
        if start > 0 && (component == "weight" || component == "bias") {
            split_at = Some(start);
        }
        start += component.len() + 1;
    }
    match split_at.or_else(|| full_name.rfind('.').map(|dot| dot + 1)) {
        Some(at) => (&full_name[..at - 1], &full_name[at..]),
        None => ("", full_name),
    }
}

/// A Hugging Face checkpoint opened for reading. Tensor data is never copied: views point into
/// read-only memory maps of the safetensors files, so memory use does not grow with model size.
///
/// The files must not be modified while the checkpoint is open (as with any memory map).
pub struct Checkpoint {
    model_dir: PathBuf,
    config: Value,
    shards: Vec<Shard>,
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
    companion_files: Vec<PathBuf>,
}

impl Checkpoint {
    /// Opens a model folder holding `config.json` and either `model.safetensors` or the shards
    /// listed by `model.safetensors.index.json`; or a single `.safetensors` file, which then has
    /// an empty config. Every header is validated before this returns.
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot open checkpoint {}", path.display()))?;
        if meta.is_file() {
            return Self::open_file(path);
        }
        let folder = ModelFolder::new(path)?;
        let config = read_config(&folder.file(CONFIG_FILE)?)?;
        let single = folder.file(SINGLE_FILE)?;
        let index = folder.file(INDEX_FILE)?;
        let shard_paths = if single.is_file() {
            vec![(single, Vec::new())]
        } else if index.is_file() {
            shards_from_index(&folder, &index)?
        } else {
            let hint = if path.join("pytorch_model.bin").exists()
                || path.join("pytorch_model.bin.index.json").exists()
            {
                " It holds PyTorch .bin weights, which kvant does not read: convert them to safetensors first."
            } else {
                ""
            };
            bail!(
                "{} holds neither {SINGLE_FILE} nor {INDEX_FILE}.{hint}",
                path.display()
            );
        };

        let mut checkpoint = Checkpoint {
            model_dir: path.to_path_buf(),
            config,
            shards: Vec::new(),
            entries: Vec::new(),
            by_name: HashMap::new(),
            companion_files: companion_files(&folder)?,
        };
        for (shard_path, indexed_names) in shard_paths {
            checkpoint.add_shard(shard_path, &indexed_names, &index)?;
        }
        Ok(checkpoint)
    }

    fn open_file(path: &Path) -> Result<Checkpoint> {
        let mut checkpoint = Checkpoint {
            model_dir: match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
                _ => PathBuf::from("."),
            },
            config: Value::Object(Default::default()),
            shards: Vec::new(),
            entries: Vec::new(),
            by_name: HashMap::new(),
            companion_files: Vec::new(),
        };
        checkpoint.add_shard(path.to_path_buf(), &[], Path::new(""))?;
        Ok(checkpoint)
    }

    /// Maps and validates one shard; `indexed_names` are the tensors the index places in it,
    /// all of which must be there.
    fn add_shard(&mut self, path: PathBuf, indexed_names: &[String], index: &Path) -> Result<()> {
        let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only and the documented contract is that checkpoint files are
        // not modified while open; a change underneath would be a user error like any other.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        let parsed = header::parse(&mmap)
            .with_context(|| format!("invalid safetensors file {}", path.display()))?;

        let stored: HashSet<&str> = parsed
            .tensors
            .iter()
            .map(|t| t.spec.name.as_str())
            .collect();
        for name in indexed_names {
            if !stored.contains(name.as_str()) {
                bail!(
                    "{} says tensor `{name}` is in {}, but that file has no such tensor: \
                     the download is incomplete or the index is stale",
                    index.display(),
                    path.display()
                );
            }
        }
        let indexed: HashSet<&str> = indexed_names.iter().map(String::as_str).collect();
        let shard = self.shards.len();
        for HeaderTensor { spec, begin, end } in parsed.tensors {
            if let Some(&other) = self.by_name.get(&spec.name) {
                bail!(
                    "tensor `{}` is stored twice: in {} and in {}; remove the stale file",
                    spec.name,
                    self.shards[self.entries[other].shard].path.display(),
                    path.display()
                );
            }
            if !indexed.is_empty() && !indexed.contains(spec.name.as_str()) {
                log::warn!(
                    "{} holds tensor `{}` that {} does not list; reading it anyway",
                    path.display(),
                    spec.name,
                    index.display()
                );
            }
            self.by_name.insert(spec.name.clone(), self.entries.len());
            self.entries.push(Entry {
                spec,
                shard,
                begin,
                end,
            });
        }
        self.shards.push(Shard {
            path,
            mmap,
            data_start: parsed.data_start,
        });
        Ok(())
    }

    /// Full tensor names in storage order: shard by shard, by position in the file.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.entries.iter().map(|e| e.spec.name.as_str())
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The spec of a tensor, its `name` being the full name; `None` if there is no such tensor.
    pub fn spec(&self, name: &str) -> Option<&TensorSpec> {
        self.by_name.get(name).map(|&i| &self.entries[i].spec)
    }

    /// Zero-copy view of a tensor's data, straight from the memory map; `name` in the view is
    /// the full name.
    pub fn view(&self, name: &str) -> Result<TensorView<'_>> {
        let entry = self
            .by_name
            .get(name)
            .map(|&i| &self.entries[i])
            .with_context(|| {
                format!(
                    "checkpoint {} has no tensor named `{name}`",
                    self.model_dir.display()
                )
            })?;
        let shard = &self.shards[entry.shard];
        let data = &shard.mmap[shard.data_start + entry.begin..shard.data_start + entry.end];
        Ok(TensorView {
            name: &entry.spec.name,
            dtype: entry.spec.dtype,
            shape: &entry.spec.shape,
            data,
        })
    }

    /// Drops this process's resident pages of a tensor once it has been used, so that streaming
    /// through a model keeps resident memory near one module instead of the whole file. The
    /// bytes stay readable: touching them again reads them back from the file (the page cache).
    pub fn release(&self, name: &str) {
        if let Ok(view) = self.view(name) {
            self.release_bytes(view.data);
        }
    }

    /// [`release`](Self::release) for part of a view's data; bytes that are not in one of this
    /// checkpoint's maps are ignored.
    pub fn release_bytes(&self, data: &[u8]) {
        let at = data.as_ptr() as usize;
        let Some(shard) = self.shards.iter().find(|s| {
            let start = s.mmap.as_ptr() as usize;
            at >= start && at + data.len() <= start + s.mmap.len()
        }) else {
            return;
        };
        // SAFETY: the map is a read-only shared mapping of a file that is not modified while
        // open, so MADV_DONTNEED only forgets pages: any later read faults the same bytes in
        // again and outstanding views stay valid. Pages shared with neighbouring bytes are
        // dropped too and simply faulted in again. Failure changes nothing: it is only advice.
        #[cfg(unix)]
        unsafe {
            let offset = at - shard.mmap.as_ptr() as usize;
            let _ = shard.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, data.len());
        }
    }

    /// Full names of the tensors under a module path: `prefix` itself and everything below
    /// `prefix.`; component boundaries are respected (`layers.1` does not match `layers.10.x`).
    /// An empty prefix matches every tensor.
    pub fn tensors_with_prefix(&self, prefix: &str) -> Vec<&str> {
        self.tensor_names()
            .filter(|name| {
                prefix.is_empty()
                    || name
                        .strip_prefix(prefix)
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
            })
            .collect()
    }

    /// Tensors grouped by module (see [`split_module_name`]), modules in order of first
    /// appearance.
    pub fn modules(&self) -> Vec<ModuleTensors<'_>> {
        let mut modules: Vec<ModuleTensors<'_>> = Vec::new();
        let mut position: HashMap<&str, usize> = HashMap::new();
        for name in self.tensor_names() {
            let (prefix, _) = split_module_name(name);
            let i = *position.entry(prefix).or_insert_with(|| {
                modules.push(ModuleTensors {
                    prefix,
                    tensors: Vec::new(),
                });
                modules.len() - 1
            });
            modules[i].tensors.push(name);
        }
        modules
    }

    /// The parsed `config.json` (an empty object for a bare `.safetensors` file).
    pub fn config(&self) -> &Value {
        &self.config
    }

    /// `config.json`'s `quantization_config`, present when the checkpoint is already quantized.
    pub fn quantization_config(&self) -> Option<&Value> {
        self.config.get("quantization_config")
    }

    /// The folder the checkpoint was read from (the file's folder for a bare `.safetensors`).
    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }

    /// The safetensors files read, in order.
    pub fn shard_paths(&self) -> impl Iterator<Item = &Path> + '_ {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// Total size of all tensor data in bytes (what an index's `metadata.total_size` states).
    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(|e| (e.end - e.begin) as u64).sum()
    }

    /// Files to carry over to a converted copy: tokenizer files, generation config, chat
    /// template, license, remote code. Never weights or `config.json`.
    pub fn companion_files(&self) -> &[PathBuf] {
        &self.companion_files
    }
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("model_dir", &self.model_dir)
            .field(
                "shards",
                &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.entries.len())
            .finish_non_exhaustive()
    }
}

/// Reads `config.json`, reporting the line and column of a syntax error.
fn read_config(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read {}: a Hugging Face model folder needs its config.json",
            path.display()
        )
    })?;
    let config = parse_json(path, &text)?;
    if !config.is_object() {
        bail!(
            "{} must hold a JSON object, found {}",
            path.display(),
            json_kind(&config)
        );
    }
    Ok(config)
}

/// Parses the text of a JSON file; serde_json's message carries the line and column.
fn parse_json(path: &Path, text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| {
        anyhow::anyhow!(
            "{} is not valid JSON: {e}; fix or re-download the file",
            path.display()
        )
    })
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads the index and resolves each shard it names, with the tensors it places there, shards
/// in file-name order. Refuses shard paths that leave the model folder.
fn shards_from_index(folder: &ModelFolder, index: &Path) -> Result<Vec<(PathBuf, Vec<String>)>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let value = parse_json(index, &text)?;
    let weight_map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .with_context(|| format!("{} has no `weight_map` object", index.display()))?;

    let mut by_shard: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (tensor, shard) in weight_map {
        let shard = shard.as_str().with_context(|| {
            format!(
                "{}: `weight_map.{tensor}` must be a file name, found {shard}",
                index.display()
            )
        })?;
        by_shard.entry(shard).or_default().push(tensor.clone());
    }

    by_shard
        .into_iter()
        .map(|(shard, names)| {
            let path = resolve_shard(folder, shard).with_context(|| {
                format!(
                    "{} maps tensor `{}` to shard `{shard}`",
                    index.display(),
                    names[0]
                )
            })?;
            Ok((path, names))
        })
        .collect()
}

/// Resolves a shard path from an index, refusing absolute paths and `.`/`..` components
/// before looking at the file system, then links leading out of the folder.
fn resolve_shard(folder: &ModelFolder, shard: &str) -> Result<PathBuf> {
    let relative = Path::new(shard);
    if shard.is_empty()
        || !relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
    {
        bail!(
            "refusing shard path `{shard}`: shard paths must stay inside the model folder \
             (relative, without `.` or `..` components); the index may be malicious or corrupt"
        );
    }
    let path = folder.file(shard)?;
    if !path.exists() {
        bail!(
            "shard {} is missing: download the complete checkpoint (every file the index lists)",
            path.display()
        );
    }
    Ok(path)
}

/// A model folder, resolved once so that every file read from it can be checked to really lie
/// inside it: a link to elsewhere could make kvant read, or copy into its output, a file the
/// user never meant to share.
struct ModelFolder {
    dir: PathBuf,
    real_dir: PathBuf,
}

impl ModelFolder {
    fn new(dir: &Path) -> Result<ModelFolder> {
        let real_dir = dir
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", dir.display()))?;
        Ok(ModelFolder {
            dir: dir.to_path_buf(),
            real_dir,
        })
    }

    /// `dir/relative`, refused when it exists but resolves outside the folder. One exception:
    /// a Hugging Face cache snapshot (`<repo>/snapshots/<rev>/`) links its files into
    /// `<repo>/blobs/`, which belongs to the same download.
    fn file(&self, relative: &str) -> Result<PathBuf> {
        let path = self.dir.join(relative);
        let Ok(real) = path.canonicalize() else {
            // Missing (or a dangling link): the caller reports it in its own terms.
            return Ok(path);
        };
        let in_hf_cache_blobs = self
            .real_dir
            .parent()
            .filter(|p| p.ends_with("snapshots"))
            .and_then(Path::parent)
            .is_some_and(|repo| real.starts_with(repo.join("blobs")));
        if !real.starts_with(&self.real_dir) && !in_hf_cache_blobs {
            bail!(
                "refusing {}: it is a link to {}, outside the model folder; \
                 copy the file into the folder if you trust it",
                path.display(),
                real.display()
            );
        }
        Ok(path)
    }
}

/// The companion files present in the folder, sorted by name. One that links outside the
/// folder is left out with a warning rather than copied into the output.
fn companion_files(folder: &ModelFolder) -> Result<Vec<PathBuf>> {
    let dir = &folder.dir;
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let is_remote_code =
            name.ends_with(".py") && REMOTE_CODE_PREFIXES.iter().any(|p| name.starts_with(p));
        if !(COMPANION_FILES.contains(&name) || is_remote_code) {
            continue;
        }
        match folder.file(name) {
            Ok(path) if path.is_file() => found.push(path),
            Ok(_) => {}
            Err(e) => log::warn!("not copying {name}: {e:#}"),
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::split_module_name;

    #[test]
    fn module_split_keeps_quantized_companions_with_their_module() {
        assert_eq!(
            split_module_name("model.layers.0.mlp.up_proj.weight"),
            ("model.layers.0.mlp.up_proj", "weight")
        );
        assert_eq!(split_module_name("lm_head.bias"), ("lm_head", "bias"));
        assert_eq!(
            split_module_name("a.q_proj.weight.quant_state.bitsandbytes__nf4"),
            ("a.q_proj", "weight.quant_state.bitsandbytes__nf4")
        );
        assert_eq!(
            split_module_name("a.q_proj.qweight"),
            ("a.q_proj", "qweight")
        );
        assert_eq!(split_module_name("a.q_proj.SCB"), ("a.q_proj", "SCB"));
        assert_eq!(split_module_name("weight"), ("", "weight"));
        assert_eq!(split_module_name("logit_scale"), ("", "logit_scale"));
    }
}
