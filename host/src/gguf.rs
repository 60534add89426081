//! Reader for llama.cpp's GGUF checkpoints, and the mapping back to Hugging Face Llama layout.
//!
//! A GGUF file is: the magic `GGUF`, a version (2 and 3 are read; both use 64-bit counts), the
//! tensor count, the metadata count, the metadata key/values, the tensor infos (name, dimensions
//! innermost first, ggml type, offset into the data section), then the data section, which starts
//! at the next multiple of `general.alignment` (default 32). Everything is little-endian.
//!
//! Every count, length and offset is checked against the file size before it is used, so a
//! damaged or hostile file gives an error naming the file and the field, never a panic or a
//! huge allocation.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use memmap2::Mmap;
use serde_json::json;

/// Data-section alignment when the file does not set `general.alignment`.
pub const DEFAULT_ALIGNMENT: usize = 32;

/// ggml allows at most this many dimensions.
const MAX_DIMS: usize = 4;

/// Arrays nested deeper than this are rejected (real files nest at most one level).
const MAX_NESTING: usize = 8;

/// Every ggml type GGUF files may hold: (id, name, values per block, bytes per block). The reader
/// needs the sizes to bound-check tensors of any type, including ones kvant cannot dequantize.
const GGML_TYPES: &[(u32, &str, usize, usize)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7, one byte (0 or 1).
    Bool(bool),
    /// Type 8: a u64 length and UTF-8 bytes.
    String(String),
    /// Type 9: an element type, a u64 count and the elements.
    Array(Vec<Value>),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float. F32 values go through their shortest decimal form, so that the
    /// f32 `1e-5` becomes the f64 `1e-5` rather than `9.999999747378752e-6`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => v.to_string().parse().ok(),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) => Some(v),
            _ => None,
        }
    }

    /// The GGUF name of this value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::F32(_) => "float32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F64(_) => "float64",
        }
    }
}

/// The metadata key/values of a file, in file order.
#[derive(Clone, Debug, Default)]
pub struct Metadata {
    entries: Vec<(String, Value)>,
    index: HashMap<String, usize>,
}

impl Metadata {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    /// All key/values in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no keys.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `key` as an unsigned integer; `Ok(None)` when absent, an error when of another type.
    pub fn u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", Value::as_u64)
    }

    /// `key` as a float; `Ok(None)` when absent, an error when of another type.
    pub fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", Value::as_f64)
    }

    /// `key` as a boolean; `Ok(None)` when absent, an error when of another type.
    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", Value::as_bool)
    }

    /// `key` as a string; `Ok(None)` when absent, an error when of another type.
    pub fn str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", Value::as_str)
    }

    /// `key` as an array; `Ok(None)` when absent, an error when of another type.
    pub fn array(&self, key: &str) -> Result<Option<&[Value]>> {
        self.typed(key, "an array", Value::as_array)
    }

    /// `key` as an array of strings; `Ok(None)` when absent.
    pub fn strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(items) = self.array(key)? else { return Ok(None) };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().ok_or_else(|| {
                    anyhow!("metadata `{key}`[{i}] is {}, expected a string", v.type_name())
                })
            })
            .collect::<Result<_>>()
            .map(Some)
    }

    /// `key` as an unsigned integer, failing when absent.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.u64(key)?.ok_or_else(|| anyhow!("metadata key `{key}` is missing"))
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        f: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => f(v).map(Some).ok_or_else(|| {
                anyhow!("metadata key `{key}` is {} {v:?}, expected {expected}", v.type_name())
            }),
        }
    }
}

/// Where one tensor lives in the file and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// GGUF name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions as GGUF stores them: innermost (contiguous) first.
    pub dims: Vec<usize>,
    /// ggml type number (`enum ggml_type`).
    pub ggml_type: u32,
    /// ggml type name (`Q4_1`, `F32`...).
    pub type_name: &'static str,
    /// Offset from the start of the data section, as stored.
    pub offset: usize,
    /// Number of elements.
    pub n_elements: usize,
    /// Number of bytes of data.
    pub n_bytes: usize,
    /// Absolute byte range in the file.
    range: Range<usize>,
}

impl TensorInfo {
    /// Shape in Hugging Face / PyTorch order (outermost first): the GGUF dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// An open GGUF file: parsed header, metadata and tensor infos over memory-mapped data.
pub struct GgufFile {
    path: PathBuf,
    data: Storage,
    version: u32,
    alignment: usize,
    data_offset: usize,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the map is read-only; like every mmap-based checkpoint reader we rely on the
        // file not being truncated while it is open.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        GgufFile::parse(path.to_path_buf(), Storage::Mapped(map))
    }

    /// Parses a GGUF file held in memory; `name` is used in messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<GgufFile> {
        GgufFile::parse(name.into(), Storage::Owned(bytes))
    }

    fn parse(path: PathBuf, data: Storage) -> Result<GgufFile> {
        let parsed = parse(data.bytes()).with_context(|| format!("{}: not a valid GGUF file", path.display()))?;
        let by_name = parsed.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(GgufFile {
            path,
            data,
            version: parsed.version,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            by_name,
        })
    }

    /// The path given to [`GgufFile::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the data section and of every tensor in it.
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// The metadata key/values.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor called `name` (GGUF name).
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor of this file.
    pub fn tensor_data(&self, tensor: &TensorInfo) -> &[u8] {
        &self.data.bytes()[tensor.range.clone()]
    }

    /// `general.architecture`, e.g. `llama`.
    pub fn architecture(&self) -> Result<&str> {
        self.metadata
            .str("general.architecture")?
            .ok_or_else(|| anyhow!("{}: metadata key `general.architecture` is missing", self.path.display()))
    }

    fn arch_u64(&self, arch: &str, key: &str) -> Result<Option<u64>> {
        self.metadata.u64(&format!("{arch}.{key}"))
    }

    fn arch_require(&self, arch: &str, key: &str) -> Result<u64> {
        self.metadata.require_u64(&format!("{arch}.{key}"))
    }

    /// A Hugging Face `config.json` for the model (F32 weights), built from the `<arch>.*` and
    /// `tokenizer.ggml.*` metadata. Supports `llama` (also Mistral-style models, which llama.cpp
    /// files as `llama`) and `qwen2`.
    pub fn hf_config(&self) -> Result<serde_json::Value> {
        self.hf_config_inner().with_context(|| format!("{}: building config.json", self.path.display()))
    }

    fn hf_config_inner(&self) -> Result<serde_json::Value> {
        let arch = self.architecture()?;
        let (class, model_type) = match arch {
            "llama" => ("LlamaForCausalLM", "llama"),
            "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
            other => bail!("architecture `{other}` cannot be exported yet (supported: llama, qwen2)"),
        };
        if self.tensor("rope_freqs.weight").is_some() {
            bail!("the file carries `rope_freqs.weight` (Llama 3.1-style rope scaling), which is not supported yet");
        }
        let md = &self.metadata;
        let hidden = self.arch_require(arch, "embedding_length")?;
        let heads = self.arch_require(arch, "attention.head_count")?;
        ensure!(heads > 0 && hidden % heads == 0, "hidden size {hidden} is not a multiple of {heads} heads");
        let kv_heads = self.arch_u64(arch, "attention.head_count_kv")?.unwrap_or(heads);
        let head_dim = self.arch_u64(arch, "attention.key_length")?.unwrap_or(hidden / heads);
        let eps = md
            .f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| anyhow!("metadata key `{arch}.attention.layer_norm_rms_epsilon` is missing"))?;
        let vocab = match self.arch_u64(arch, "vocab_size")? {
            Some(v) => v as usize,
            None => match md.array("tokenizer.ggml.tokens")? {
                Some(tokens) => tokens.len(),
                None => *self
                    .tensor("token_embd.weight")
                    .and_then(|t| t.dims.get(1))
                    .ok_or_else(|| anyhow!("cannot tell the vocabulary size: no `{arch}.vocab_size`, tokens or token_embd"))?,
            },
        };
        let mut config = json!({
            "architectures": [class],
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": self.arch_require(arch, "feed_forward_length")?,
            "num_hidden_layers": self.arch_require(arch, "block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.arch_require(arch, "context_length")?,
            "rms_norm_eps": eps,
            "rope_theta": md.f64(&format!("{arch}.rope.freq_base"))?.unwrap_or(10000.0),
            "rope_scaling": self.rope_scaling(arch)?,
            "vocab_size": vocab,
            "tie_word_embeddings": self.tensor("output.weight").is_none(),
            "torch_dtype": "float32",
            "use_cache": true,
        });
        let obj = config.as_object_mut().expect("a JSON object");
        if arch == "llama" {
            obj.insert("attention_bias".into(), self.tensor("blk.0.attn_q.bias").is_some().into());
            obj.insert("mlp_bias".into(), false.into());
        }
        for (key, hf) in [("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")] {
            if let Some(id) = md.u64(&format!("tokenizer.ggml.{key}_token_id"))? {
                obj.insert(hf.into(), id.into());
            }
        }
        Ok(config)
    }

    fn rope_scaling(&self, arch: &str) -> Result<serde_json::Value> {
        let kind = self.metadata.str(&format!("{arch}.rope.scaling.type"))?;
        match kind {
            None | Some("none") => Ok(serde_json::Value::Null),
            Some("linear") => {
                let factor = self
                    .metadata
                    .f64(&format!("{arch}.rope.scaling.factor"))?
                    .ok_or_else(|| anyhow!("linear rope scaling without `{arch}.rope.scaling.factor`"))?;
                Ok(json!({"type": "linear", "rope_type": "linear", "factor": factor}))
            }
            Some(other) => bail!("rope scaling `{other}` is not supported yet"),
        }
    }

    /// For a Hugging Face tensor name, the head count whose Q/K row permutation llama.cpp applied
    /// (and [`unpermute_qk`] must undo): the query heads for `q_proj`, the KV heads for `k_proj`,
    /// weights and biases alike. `None` for every other tensor and for architectures that llama.cpp
    /// converts without permuting (qwen2).
    pub fn qk_permutation_heads(&self, hf_name: &str) -> Result<Option<usize>> {
        if self.architecture()? != "llama" {
            return Ok(None);
        }
        let key = if hf_name.contains(".self_attn.q_proj.") {
            "llama.attention.head_count"
        } else if hf_name.contains(".self_attn.k_proj.") {
            if self.metadata.get("llama.attention.head_count_kv").is_some() {
                "llama.attention.head_count_kv"
            } else {
                "llama.attention.head_count"
            }
        } else {
            return Ok(None);
        };
        Ok(Some(self.metadata.require_u64(key)? as usize))
    }
}

/// The Hugging Face name of a GGUF tensor of a Llama-family model, or `None` when it has no
/// counterpart (e.g. `rope_freqs.weight`).
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    let (base, suffix) = gguf_name.rsplit_once('.')?;
    if !matches!(suffix, "weight" | "bias") {
        return None;
    }
    let top = match base {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(top) = top {
        return Some(format!("{top}.{suffix}"));
    }
    let rest = base.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let module = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.{suffix}"))
}

/// Undoes llama.cpp's rotary row permutation of a Q or K projection (`rows` × `cols`, row-major;
/// `cols` is 1 for a bias). Within each head of `rows / n_head` rows, llama.cpp interleaved the
/// two rotary halves: its row `2i + j` is Hugging Face's row `j·half + i`.
pub fn unpermute_qk<T: Copy>(data: &[T], rows: usize, cols: usize, n_head: usize) -> Result<Vec<T>> {
    ensure!(
        n_head > 0 && rows % (2 * n_head) == 0,
        "cannot un-permute {rows} rows into {n_head} heads of rotary pairs"
    );
    ensure!(data.len() == rows * cols, "un-permute: {} values for {rows} x {cols}", data.len());
    let head = rows / n_head;
    let half = head / 2;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let src = (h * head + 2 * i + j) * cols;
                out.extend_from_slice(&data[src..src + cols]);
            }
        }
    }
    Ok(out)
}

/// Values per block and bytes per block of a ggml type, with its name.
pub fn ggml_type_info(id: u32) -> Option<(&'static str, usize, usize)> {
    GGML_TYPES.iter().find(|t| t.0 == id).map(|&(_, name, bs, ts)| (name, bs, ts))
}

struct Parsed {
    version: u32,
    alignment: usize,
    data_offset: usize,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
}

/// A bounds-checked little-endian cursor.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            bail!(
                "{n} bytes needed at offset {} but the file ends at {} (truncated?)",
                self.pos,
                self.buf.len()
            );
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// A count that must fit in `usize` and, at `min_size` bytes per item, in the rest of the file.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize> {
        let at = self.pos;
        let n = self.u64()?;
        let fits = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(min_size))
            .is_some_and(|bytes| bytes <= self.remaining());
        if !fits {
            bail!(
                "{what} count {n} (at offset {at}) cannot fit in the {} bytes left in the file: it is truncated or corrupt",
                self.remaining()
            );
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let at = self.pos;
        let len = self.count(1, "string length")?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| anyhow!("string at offset {at} is not UTF-8: {e}"))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8()?),
            1 => Value::I8(self.u8()? as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.u8()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("bool byte {b} at offset {} is neither 0 nor 1", self.pos - 1),
            },
            8 => Value::String(self.string()?),
            9 => {
                ensure!(depth < MAX_NESTING, "arrays nested more than {MAX_NESTING} deep");
                let elem = self.u32()?;
                let min = min_value_size(elem).ok_or_else(|| anyhow!("array of unknown value type {elem}"))?;
                let n = self.count(min, "array element")?;
                let mut items = Vec::with_capacity(n);
                for i in 0..n {
                    items.push(self.value(elem, depth + 1).with_context(|| format!("array element {i}"))?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => bail!("unknown value type {other} at offset {}", self.pos - 4),
        })
    }
}

/// The fewest bytes a value of this type can occupy (0 for unknown types).
fn min_value_size(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        10..=12 => 8,
        _ => return None,
    })
}

fn parse(buf: &[u8]) -> Result<Parsed> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c.take(4).context("reading the magic")?;
    if magic != b"GGUF" {
        bail!("magic is {magic:02x?}, expected \"GGUF\"");
    }
    let version = c.u32().context("reading the version")?;
    match version {
        2 | 3 => {}
        1 => bail!("GGUF version 1 (32-bit counts) is not supported; versions 2 and 3 are"),
        v if v.swap_bytes() <= 3 => bail!("the file is big-endian (version {}); only little-endian GGUF is supported", v.swap_bytes()),
        v => bail!("unsupported GGUF version {v} (2 and 3 are supported)"),
    }
    // A tensor info is at least a name length, n_dims, one dim, type and offset; a key/value at
    // least a key length and a type.
    let n_tensors = c.count(8 + 4 + 8 + 4 + 8, "tensor").context("reading the tensor count")?;
    let n_kv = c.count(8 + 4, "metadata key/value").context("reading the metadata count")?;

    let mut metadata = Metadata::default();
    metadata.entries.reserve(n_kv);
    for i in 0..n_kv {
        let key = c.string().with_context(|| format!("reading the key of metadata entry {i}"))?;
        let ty = c.u32().with_context(|| format!("reading the type of metadata key `{key}`"))?;
        let value = c.value(ty, 0).with_context(|| format!("reading metadata key `{key}`"))?;
        if metadata.index.insert(key.clone(), i).is_some() {
            bail!("metadata key `{key}` appears twice");
        }
        metadata.entries.push((key, value));
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() => *a as usize,
        Some(v) => bail!("metadata key `general.alignment` is {v:?}; expected a uint32 power of two"),
    };

    let mut tensors = Vec::with_capacity(n_tensors);
    let mut names = HashMap::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let t = tensor_info(&mut c).with_context(|| format!("reading tensor info {i}"))?;
        if names.insert(t.0.clone(), i).is_some() {
            bail!("tensor `{}` appears twice", t.0);
        }
        tensors.push(t);
    }

    let data_offset = c.pos.div_ceil(alignment) * alignment;
    ensure!(
        data_offset <= buf.len(),
        "the data section would start at offset {data_offset}, past the end of the file ({} bytes)",
        buf.len()
    );

    let tensors = tensors
        .into_iter()
        .map(|(name, dims, ggml_type, offset)| {
            place_tensor(name, dims, ggml_type, offset, alignment, data_offset, buf.len())
        })
        .collect::<Result<Vec<_>>>()?;

    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| t.range.start);
    for pair in order.windows(2) {
        if pair[0].range.end > pair[1].range.start {
            bail!(
                "tensors `{}` (bytes {:?}) and `{}` (bytes {:?}) overlap",
                pair[0].name,
                pair[0].range,
                pair[1].name,
                pair[1].range
            );
        }
    }

    Ok(Parsed { version, alignment, data_offset, metadata, tensors })
}

/// Name, dims, type and offset of one tensor, as stored.
fn tensor_info(c: &mut Cursor) -> Result<(String, Vec<usize>, u32, u64)> {
    let name = c.string().context("reading the name")?;
    let with_name = || format!("tensor `{name}`");
    let n_dims = c.u32().with_context(with_name)? as usize;
    ensure!(
        (1..=MAX_DIMS).contains(&n_dims),
        "tensor `{name}` has {n_dims} dimensions; ggml allows 1 to {MAX_DIMS}"
    );
    let mut dims = Vec::with_capacity(n_dims);
    for _ in 0..n_dims {
        let d = c.u64().with_context(with_name)?;
        dims.push(usize::try_from(d).map_err(|_| anyhow!("tensor `{name}`: dimension {d} is too large"))?);
    }
    let ggml_type = c.u32().with_context(with_name)?;
    let offset = c.u64().with_context(with_name)?;
    Ok((name, dims, ggml_type, offset))
}

/// Checks a tensor's type, size and placement against the file.
fn place_tensor(
    name: String,
    dims: Vec<usize>,
    ggml_type: u32,
    offset: u64,
    alignment: usize,
    data_offset: usize,
    file_len: usize,
) -> Result<TensorInfo> {
    let (type_name, block, type_size) =
        ggml_type_info(ggml_type).ok_or_else(|| anyhow!("tensor `{name}` has unknown ggml type {ggml_type}"))?;
    let n_elements = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| anyhow!("tensor `{name}`: dimensions {dims:?} overflow"))?;
    ensure!(
        dims[0] % block == 0,
        "tensor `{name}`: innermost dimension {} is not a multiple of the {type_name} block size {block}",
        dims[0]
    );
    let n_bytes = (n_elements / block)
        .checked_mul(type_size)
        .ok_or_else(|| anyhow!("tensor `{name}`: byte size overflows"))?;
    let offset = usize::try_from(offset).map_err(|_| anyhow!("tensor `{name}`: offset {offset} is too large"))?;
    ensure!(
        offset % alignment == 0,
        "tensor `{name}`: offset {offset} is not a multiple of the alignment {alignment}"
    );
    let start = data_offset
        .checked_add(offset)
        .filter(|&s| s <= file_len)
        .ok_or_else(|| anyhow!("tensor `{name}`: offset {offset} lies past the end of the file ({file_len} bytes)"))?;
    let end = start
        .checked_add(n_bytes)
        .filter(|&e| e <= file_len)
        .ok_or_else(|| {
            anyhow!(
                "tensor `{name}` ({type_name} {dims:?}, {n_bytes} bytes at file offset {start}) runs past the end of the file ({file_len} bytes)"
            )
        })?;
    Ok(TensorInfo { name, dims, ggml_type, type_name, offset, n_elements, n_bytes, range: start..end })
}

#[cfg(test)]
pub(crate) mod testing {
    /// Builds GGUF bytes for tests.
    #[derive(Default)]
    pub(crate) struct Builder {
        kv: Vec<u8>,
        n_kv: u64,
        infos: Vec<u8>,
        n_tensors: u64,
        data: Vec<u8>,
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    impl Builder {
        pub(crate) fn kv(mut self, key: &str, ty: u32, value: &[u8]) -> Self {
            string(&mut self.kv, key);
            self.kv.extend(ty.to_le_bytes());
            self.kv.extend(value);
            self.n_kv += 1;
            self
        }

        pub(crate) fn kv_u32(self, key: &str, v: u32) -> Self {
            self.kv(key, 4, &v.to_le_bytes())
        }

        pub(crate) fn kv_f32(self, key: &str, v: f32) -> Self {
            self.kv(key, 6, &v.to_le_bytes())
        }

        pub(crate) fn kv_str(self, key: &str, v: &str) -> Self {
            let mut b = Vec::new();
            string(&mut b, v);
            self.kv(key, 8, &b)
        }

        pub(crate) fn kv_strs(self, key: &str, v: &[&str]) -> Self {
            let mut b = 8u32.to_le_bytes().to_vec();
            b.extend((v.len() as u64).to_le_bytes());
            for s in v {
                string(&mut b, s);
            }
            self.kv(key, 9, &b)
        }

        /// A tensor at an explicit offset, with `bytes` appended to the data section.
        pub(crate) fn tensor_at(mut self, name: &str, dims: &[u64], ty: u32, offset: u64, bytes: &[u8]) -> Self {
            string(&mut self.infos, name);
            self.infos.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                self.infos.extend(d.to_le_bytes());
            }
            self.infos.extend(ty.to_le_bytes());
            self.infos.extend(offset.to_le_bytes());
            self.data.extend(bytes);
            self.n_tensors += 1;
            self
        }

        /// A tensor appended at the next aligned offset.
        pub(crate) fn tensor(mut self, name: &str, dims: &[u64], ty: u32, bytes: &[u8]) -> Self {
            let offset = self.data.len().div_ceil(32) * 32;
            self.data.resize(offset, 0);
            self = self.tensor_at(name, dims, ty, offset as u64, bytes);
            self
        }

        pub(crate) fn build(&self) -> Vec<u8> {
            self.build_aligned(32)
        }

        pub(crate) fn build_aligned(&self, alignment: usize) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend(3u32.to_le_bytes());
            out.extend(self.n_tensors.to_le_bytes());
            out.extend(self.n_kv.to_le_bytes());
            out.extend(&self.kv);
            out.extend(&self.infos);
            out.resize(out.len().div_ceil(alignment) * alignment, 0);
            out.extend(&self.data);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Builder;
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn small_llama() -> Builder {
        Builder::default()
            .kv_str("general.architecture", "llama")
            .kv_u32("llama.embedding_length", 8)
            .kv_u32("llama.block_count", 1)
            .kv_u32("llama.feed_forward_length", 16)
            .kv_u32("llama.attention.head_count", 2)
            .kv_u32("llama.attention.head_count_kv", 1)
            .kv_u32("llama.context_length", 64)
            .kv_f32("llama.rope.freq_base", 100000.0)
            .kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
            .kv_strs("tokenizer.ggml.tokens", &["a", "b", "c"])
            .kv_u32("tokenizer.ggml.bos_token_id", 1)
            .tensor("token_embd.weight", &[8, 3], 0, &f32_bytes(&[0.5; 24]))
            .tensor("output_norm.weight", &[8], 0, &f32_bytes(&[1.0; 8]))
    }

    fn err(bytes: Vec<u8>) -> String {
        format!("{:#}", GgufFile::from_bytes("t.gguf", bytes).unwrap_err())
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let f = GgufFile::from_bytes("t.gguf", small_llama().build()).unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(f.alignment(), 32);
        assert_eq!(f.architecture().unwrap(), "llama");
        assert_eq!(f.metadata().strings("tokenizer.ggml.tokens").unwrap().unwrap(), ["a", "b", "c"]);
        assert_eq!(f.metadata().u64("llama.block_count").unwrap(), Some(1));
        assert!(f.metadata().u64("general.architecture").is_err());
        let t = f.tensor("token_embd.weight").unwrap();
        assert_eq!(t.shape(), [3, 8]);
        assert_eq!((t.n_elements, t.n_bytes, t.type_name), (24, 96, "F32"));
        assert_eq!(f.tensor_data(t), f32_bytes(&[0.5; 24]));
        assert_eq!(f.tensor_data(f.tensor("output_norm.weight").unwrap()), f32_bytes(&[1.0; 8]));
        assert_eq!(f.data_offset() % 32, 0);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = small_llama().build();
        for len in 0..bytes.len() {
            assert!(GgufFile::from_bytes("t.gguf", bytes[..len].to_vec()).is_err(), "prefix {len}");
        }
    }

    #[test]
    fn rejects_bad_headers() {
        let mut b = small_llama().build();
        b[0] = b'X';
        assert!(err(b).contains("magic"));
        let mut b = small_llama().build();
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(err(b).contains("version 1"));
        let mut b = small_llama().build();
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert!(err(b).contains("big-endian"));
        let mut b = small_llama().build();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = err(b);
        assert!(e.contains("t.gguf") && e.contains("metadata key/value count"), "{e}");
    }

    #[test]
    fn rejects_huge_counts_and_lengths_without_allocating() {
        let mut huge = 8u32.to_le_bytes().to_vec();
        huge.extend((1u64 << 60).to_le_bytes());
        let e = err(Builder::default().kv("tokenizer.ggml.tokens", 9, &huge).build());
        assert!(e.contains("`tokenizer.ggml.tokens`") && e.contains("array element count"), "{e}");
        let e = err(Builder::default().kv("k", 8, &(1u64 << 40).to_le_bytes()).build());
        assert!(e.contains("`k`") && e.contains("string length"), "{e}");
    }

    #[test]
    fn rejects_bad_tensors() {
        let e = err(Builder::default().tensor("a", &[4], 0, &[0; 8]).build());
        assert!(e.contains("tensor `a`") && e.contains("past the end"), "{e}");
        let e = err(Builder::default().tensor_at("a", &[4], 0, 8, &[0; 64]).build());
        assert!(e.contains("not a multiple of the alignment"), "{e}");
        let e = err(Builder::default()
            .tensor_at("a", &[16], 0, 0, &[0; 64])
            .tensor_at("b", &[8], 0, 32, &[0; 32])
            .build());
        assert!(e.contains("overlap") && e.contains("`a`") && e.contains("`b`"), "{e}");
        let e = err(Builder::default().tensor("a", &[4], 99, &[0; 64]).build());
        assert!(e.contains("unknown ggml type 99"), "{e}");
        let e = err(Builder::default().tensor("a", &[16], 2, &[0; 64]).build());
        assert!(e.contains("block size 32"), "{e}");
        let e = err(Builder::default().tensor("a", &[u64::MAX, 4], 0, &[0; 64]).build());
        assert!(e.contains("overflow"), "{e}");
        let e = err(Builder::default().tensor("a", &[4], 0, &[0; 16]).tensor("a", &[4], 0, &[0; 16]).build());
        assert!(e.contains("appears twice"), "{e}");
    }

    #[test]
    fn honours_general_alignment() {
        let b = Builder::default().kv_u32("general.alignment", 48).build();
        assert!(err(b).contains("power of two"));
        let b = Builder::default().kv_u32("general.alignment", 64).tensor_at("a", &[4], 0, 0, &[7; 16]);
        let f = GgufFile::from_bytes("t.gguf", b.build_aligned(64)).unwrap();
        assert_eq!((f.alignment(), f.data_offset() % 64), (64, 0));
        assert_eq!(f.tensor_data(&f.tensors()[0]), [7; 16]);
    }

    #[test]
    fn builds_a_llama_config() {
        let f = GgufFile::from_bytes("t.gguf", small_llama().build()).unwrap();
        let c = f.hf_config().unwrap();
        assert_eq!(c["architectures"][0], "LlamaForCausalLM");
        assert_eq!(c["hidden_size"], 8);
        assert_eq!(c["num_key_value_heads"], 1);
        assert_eq!(c["head_dim"], 4);
        assert_eq!(c["rms_norm_eps"], 1e-5);
        assert_eq!(c["rope_theta"], 100000.0);
        assert_eq!(c["vocab_size"], 3);
        assert_eq!(c["tie_word_embeddings"], true);
        assert_eq!(c["bos_token_id"], 1);
        assert!(c.get("eos_token_id").is_none());
        let e = format!("{:#}", GgufFile::from_bytes("t.gguf", Builder::default().build()).unwrap().hf_config().unwrap_err());
        assert!(e.contains("t.gguf") && e.contains("general.architecture"), "{e}");
    }

    #[test]
    fn maps_names() {
        assert_eq!(hf_tensor_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert_eq!(hf_tensor_name("output.weight").unwrap(), "lm_head.weight");
        assert_eq!(hf_tensor_name("output_norm.weight").unwrap(), "model.norm.weight");
        assert_eq!(hf_tensor_name("blk.12.attn_q.bias").unwrap(), "model.layers.12.self_attn.q_proj.bias");
        assert_eq!(hf_tensor_name("blk.0.attn_output.weight").unwrap(), "model.layers.0.self_attn.o_proj.weight");
        assert_eq!(hf_tensor_name("blk.3.ffn_down.weight").unwrap(), "model.layers.3.mlp.down_proj.weight");
        assert_eq!(hf_tensor_name("blk.3.ffn_norm.weight").unwrap(), "model.layers.3.post_attention_layernorm.weight");
        assert_eq!(hf_tensor_name("blk.3.attn_norm.weight").unwrap(), "model.layers.3.input_layernorm.weight");
        assert_eq!(hf_tensor_name("rope_freqs.weight"), None);
        assert_eq!(hf_tensor_name("blk.x.attn_q.weight"), None);
    }

    /// llama.cpp's converter: `w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2)`.
    fn permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let half = rows / n_head / 2;
        let mut out = vec![0.0; w.len()];
        for h in 0..n_head {
            for i in 0..half {
                for j in 0..2 {
                    let src = (h * 2 * half + j * half + i) * cols;
                    let dst = (h * 2 * half + i * 2 + j) * cols;
                    out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_the_converter() {
        let (rows, cols, heads) = (24, 5, 3);
        let w: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        assert_eq!(unpermute_qk(&permute(&w, rows, cols, heads), rows, cols, heads).unwrap(), w);
        assert!(unpermute_qk(&w, rows, cols, 5).is_err());
        let f = GgufFile::from_bytes("t.gguf", small_llama().build()).unwrap();
        assert_eq!(f.qk_permutation_heads("model.layers.0.self_attn.q_proj.weight").unwrap(), Some(2));
        assert_eq!(f.qk_permutation_heads("model.layers.0.self_attn.k_proj.bias").unwrap(), Some(1));
        assert_eq!(f.qk_permutation_heads("model.layers.0.self_attn.v_proj.weight").unwrap(), None);
    }
}
