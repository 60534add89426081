//! Rebuilds Hugging Face tokenizer files from the vocabulary a GGUF file embeds.
//!
//! Supported: byte-level BPE (`tokenizer.ggml.model = gpt2`) with the GPT-2 split pattern, alone
//! (`tokenizer.ggml.pre` = `gpt2`, `default`, `mpt`, `olmo`, `jais`) or after isolating every digit
//! (`smollm`, `starcoder`, `refact`, `command-r`, `codeshell`, `exaone`, `minerva`), which is how
//! llama.cpp pre-tokenizes those vocabularies. Tokens typed CONTROL become special added tokens,
//! USER_DEFINED ones plain added tokens, both matched whole as llama.cpp does.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value as Json};

use crate::gguf::GgufFile;

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// How text is split before BPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Split {
    /// The GPT-2 pattern only.
    Gpt2,
    /// Every digit on its own first, then the GPT-2 pattern.
    DigitsThenGpt2,
}

fn split_for(pre: &str) -> Option<Split> {
    match pre {
        "gpt2" | "default" | "mpt" | "olmo" | "jais" => Some(Split::Gpt2),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            Some(Split::DigitsThenGpt2)
        }
        _ => None,
    }
}

/// The three JSON files a Hugging Face tokenizer folder holds.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizerFiles {
    /// `tokenizer.json`: what the `tokenizers` library (Python and Rust) loads.
    pub tokenizer: Json,
    /// `tokenizer_config.json`: transformers' settings (special tokens, BOS, chat template).
    pub tokenizer_config: Json,
    /// `special_tokens_map.json`.
    pub special_tokens_map: Json,
}

impl TokenizerFiles {
    /// The files as (file name, pretty-printed JSON text).
    pub fn texts(&self) -> [(&'static str, String); 3] {
        let text = |v: &Json| serde_json::to_string_pretty(v).expect("JSON values serialize") + "\n";
        [
            ("tokenizer.json", text(&self.tokenizer)),
            ("tokenizer_config.json", text(&self.tokenizer_config)),
            ("special_tokens_map.json", text(&self.special_tokens_map)),
        ]
    }

    /// Writes the three files into `dir` (which must exist).
    pub fn write_to(&self, dir: &Path) -> Result<()> {
        for (name, text) in self.texts() {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

impl IntoIterator for TokenizerFiles {
    type Item = (&'static str, String);
    type IntoIter = std::array::IntoIter<(&'static str, String), 3>;

    /// Yields (file name, JSON text), e.g. to stage the files elsewhere.
    fn into_iter(self) -> Self::IntoIter {
        self.texts().into_iter()
    }
}

/// Builds `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` from the
/// `tokenizer.ggml.*` metadata of `gguf`.
pub fn build(gguf: &GgufFile) -> Result<TokenizerFiles> {
    build_inner(gguf).with_context(|| format!("{}: rebuilding the tokenizer", gguf.path().display()))
}

fn build_inner(gguf: &GgufFile) -> Result<TokenizerFiles> {
    let md = gguf.metadata();
    let model = md.str("tokenizer.ggml.model")?.ok_or_else(|| anyhow!("metadata key `tokenizer.ggml.model` is missing"))?;
    if model != "gpt2" {
        bail!("tokenizer model `{model}` is not supported yet (only byte-level BPE, `gpt2`)");
    }
    let pre = md.str("tokenizer.ggml.pre")?.unwrap_or("default");
    let split = split_for(pre).ok_or_else(|| {
        anyhow!("pre-tokenizer `{pre}` is not supported yet (supported: gpt2 and digit-isolating ones such as smollm)")
    })?;
    let tokens = md.strings("tokenizer.ggml.tokens")?.ok_or_else(|| anyhow!("metadata key `tokenizer.ggml.tokens` is missing"))?;
    let merges = md.strings("tokenizer.ggml.merges")?.ok_or_else(|| anyhow!("metadata key `tokenizer.ggml.merges` is missing"))?;
    let types: Vec<i64> = match md.array("tokenizer.ggml.token_type")? {
        None => vec![1; tokens.len()],
        Some(types) => types
            .iter()
            .enumerate()
            .map(|(i, t)| t.as_i64().ok_or_else(|| anyhow!("`tokenizer.ggml.token_type`[{i}] is {}, expected an integer", t.type_name())))
            .collect::<Result<_>>()?,
    };
    if types.len() != tokens.len() {
        bail!("{} token types for {} tokens", types.len(), tokens.len());
    }

    let mut vocab = Map::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        if vocab.insert((*token).to_string(), id.into()).is_some() {
            bail!("token {token:?} (id {id}) appears twice in `tokenizer.ggml.tokens`");
        }
    }
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            // Byte-level tokens never hold a space (it is spelled `Ġ`), so one space separates the pair.
            let (a, b) = m.split_once(' ').filter(|(_, b)| !b.contains(' ')).ok_or_else(|| {
                anyhow!("`tokenizer.ggml.merges`[{i}] = {m:?} is not two tokens separated by one space")
            })?;
            Ok(json!([a, b]))
        })
        .collect::<Result<Vec<_>>>()?;

    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
        .map(|(id, (token, &ty))| {
            json!({
                "id": id,
                "content": token,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": ty == TOKEN_TYPE_CONTROL,
            })
        })
        .collect();

    let special = |key: &str| -> Result<Option<&str>> {
        match md.u64(&format!("tokenizer.ggml.{key}_token_id"))? {
            None => Ok(None),
            Some(id) => tokens
                .get(id as usize)
                .copied()
                .map(Some)
                .ok_or_else(|| anyhow!("`tokenizer.ggml.{key}_token_id` = {id} is not a token id (vocabulary of {})", tokens.len())),
        }
    };
    let (bos, eos, unk, pad) = (special("bos")?, special("eos")?, special("unknown")?, special("padding")?);
    let add_bos = md.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = md.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);

    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match split {
        Split::Gpt2 => byte_level,
        Split::DigitsThenGpt2 => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level],
        }),
    };

    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor(add_bos.then_some(bos).flatten(), add_eos.then_some(eos).flatten(), &vocab),
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });

    let additional: Vec<&Json> = added
        .iter()
        .filter(|t| t["special"] == true)
        .map(|t| &t["content"])
        .filter(|c| ![bos, eos, unk, pad].contains(&c.as_str()))
        .collect();
    let mut special_map = Map::new();
    for (name, token) in [("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)] {
        if let Some(token) = token {
            special_map.insert(name.into(), token.into());
        }
    }
    special_map.insert("additional_special_tokens".into(), json!(additional));

    let mut config = special_map.clone();
    let decoder: Map<String, Json> = added
        .iter()
        .map(|t| {
            let mut t = t.as_object().expect("object").clone();
            let id = t.shift_remove("id").expect("id");
            (id.to_string(), Json::Object(t))
        })
        .collect();
    config.insert("added_tokens_decoder".into(), decoder.into());
    config.insert("add_bos_token".into(), add_bos.into());
    config.insert("add_eos_token".into(), add_eos.into());
    config.insert("add_prefix_space".into(), false.into());
    config.insert("clean_up_tokenization_spaces".into(), false.into());
    if let Some(n) = gguf.metadata().u64(&format!("{}.context_length", gguf.architecture()?))? {
        config.insert("model_max_length".into(), n.into());
    }
    if let Some(template) = md.str("tokenizer.chat_template")? {
        config.insert("chat_template".into(), template.into());
    }
    // Not GPT2Tokenizer: transformers 5 rebuilds that class's pre-tokenizer from its own defaults
    // (no digit isolation), while PreTrainedTokenizerFast uses tokenizer.json as written.
    config.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());

    Ok(TokenizerFiles {
        tokenizer,
        tokenizer_config: config.into(),
        special_tokens_map: special_map.into(),
    })
}

/// ByteLevel offsets handling, plus BOS/EOS around each sequence when the file asks for them.
fn post_processor(bos: Option<&str>, eos: Option<&str>, vocab: &Map<String, Json>) -> Json {
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
    if bos.is_none() && eos.is_none() {
        return byte_level;
    }
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let wrap = |seq: &str, type_id: u32| -> Vec<Json> {
        let body = json!({"Sequence": {"id": seq, "type_id": type_id}});
        bos.map(|t| special(t, type_id)).into_iter().chain([body]).chain(eos.map(|t| special(t, type_id))).collect()
    };
    let specials: Map<String, Json> = bos
        .into_iter()
        .chain(eos)
        .map(|t| (t.to_string(), json!({"id": t, "ids": [vocab[t].clone()], "tokens": [t]})))
        .collect();
    let pair = [wrap("A", 0), wrap("B", 1)].concat();
    json!({
        "type": "Sequence",
        "processors": [
            byte_level,
            {"type": "TemplateProcessing", "single": wrap("A", 0), "pair": pair, "special_tokens": specials},
        ],
    })
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;
    use crate::gguf::testing::Builder;

    const TOKENS: [&str; 9] = ["<s>", "a", "b", "ab", "Ġ", "1", "2", "Ġa", "ĠĠ"];

    fn gguf(pre: &str, add_bos: bool) -> GgufFile {
        let mut types = 5u32.to_le_bytes().to_vec(); // array of int32
        types.extend((TOKENS.len() as u64).to_le_bytes());
        for i in 0..TOKENS.len() {
            types.extend(if i == 0 { 3i32 } else { 1 }.to_le_bytes());
        }
        let bytes = Builder::default()
            .kv_str("general.architecture", "llama")
            .kv_u32("llama.context_length", 128)
            .kv_str("tokenizer.ggml.model", "gpt2")
            .kv_str("tokenizer.ggml.pre", pre)
            .kv_strs("tokenizer.ggml.tokens", &TOKENS)
            .kv("tokenizer.ggml.token_type", 9, &types)
            .kv_strs("tokenizer.ggml.merges", &["a b", "Ġ a", "Ġ Ġ"])
            .kv_u32("tokenizer.ggml.bos_token_id", 0)
            .kv("tokenizer.ggml.add_bos_token", 7, &[add_bos as u8])
            .build();
        GgufFile::from_bytes("t.gguf", bytes).unwrap()
    }

    fn encode(files: &TokenizerFiles, text: &str) -> Vec<u32> {
        let tok = tokenizers::Tokenizer::from_str(&files.tokenizer.to_string()).unwrap();
        tok.encode(text, true).unwrap().get_ids().to_vec()
    }

    #[test]
    fn digits_are_isolated_before_the_gpt2_split_for_smollm() {
        let files = build(&gguf("smollm", false)).unwrap();
        // "ab", "  " (two spaces, then a digit), "1", "2", " a".
        assert_eq!(encode(&files, "ab  12 a"), [3, 8, 5, 6, 7]);
        assert_eq!(files.tokenizer["added_tokens"][0]["content"], "<s>");
        assert_eq!(files.tokenizer["added_tokens"][0]["special"], true);
        assert_eq!(files.special_tokens_map["bos_token"], "<s>");
        assert_eq!(files.tokenizer_config["model_max_length"], 128);
    }

    #[test]
    fn gpt2_split_keeps_a_space_with_the_number() {
        let files = build(&gguf("gpt2", false)).unwrap();
        assert_eq!(encode(&files, "ab  12 a"), [3, 4, 4, 5, 6, 7]);
    }

    #[test]
    fn bos_is_added_when_the_file_asks() {
        let files = build(&gguf("smollm", true)).unwrap();
        assert_eq!(encode(&files, "ab"), [0, 3]);
        assert_eq!(files.tokenizer_config["add_bos_token"], true);
    }

    #[test]
    fn unsupported_pre_tokenizers_are_named() {
        let e = format!("{:#}", build(&gguf("llama-bpe", false)).unwrap_err());
        assert!(e.contains("t.gguf") && e.contains("`llama-bpe`"), "{e}");
    }
}
