//! From a checkpoint's tensor headers to the model skeleton: which modules are Linears, which
//! are embeddings, norms or the output head, and which must stay dense.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use kvant_plugin_api::{Module, ModuleKind, Skeleton, TensorSpec};
use regex::Regex;
use serde_json::Value;

use crate::checkpoint::{split_module_name, Checkpoint};

/// Model types whose module naming kvant knows; anything else uses the generic rules.
pub const KNOWN_MODEL_TYPES: &[&str] =
    &["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "smollm", "gpt2"];

/// A `modules_to_not_convert` entry: `name` matches the module itself, its sub-modules
/// (`model.layers.0`), or a trailing part of the name (`down_proj`, `mlp.down_proj`);
/// `re:PATTERN` is a regular expression that must match the whole module name.
#[derive(Clone, Debug)]
pub enum ModulePattern {
    /// Plain name, prefix or suffix.
    Name(String),
    /// A regular expression over the whole name.
    Regex(Regex),
}

impl ModulePattern {
    /// Parses one pattern.
    pub fn parse(s: &str) -> Result<ModulePattern> {
        match s.strip_prefix("re:") {
            Some(re) => match Regex::new(&format!("^(?:{re})$")) {
                Ok(r) => Ok(ModulePattern::Regex(r)),
                Err(e) => bail!("module pattern `{s}` is not a valid regular expression: {e}"),
            },
            None if s.trim().is_empty() => bail!("empty module pattern"),
            None => Ok(ModulePattern::Name(s.trim().trim_matches('.').to_string())),
        }
    }

    /// True if the pattern selects `module`.
    pub fn matches(&self, module: &str) -> bool {
        match self {
            ModulePattern::Regex(r) => r.is_match(module),
            ModulePattern::Name(p) => {
                module == p
                    || module.strip_prefix(p.as_str()).is_some_and(|rest| rest.starts_with('.'))
                    || module.strip_suffix(p.as_str()).is_some_and(|rest| rest.ends_with('.'))
            }
        }
    }
}

fn is_gpt2(model_type: &str) -> bool {
    model_type == "gpt2"
}

/// Decides what a module is from its name, its tensors and the model type.
fn classify(model_type: &str, name: &str, tensors: &[TensorSpec]) -> ModuleKind {
    let last = name.rsplit('.').next().unwrap_or(name);
    let weight = tensors.iter().find(|t| t.name == "weight");
    let rank = weight.map_or(0, |w| w.shape.len());
    if name == "lm_head" || name.ends_with(".lm_head") || last == "output" && rank == 2 {
        return ModuleKind::Head;
    }
    if last.contains("embed") || matches!(last, "wte" | "wpe" | "word_embeddings" | "position_embeddings") {
        return ModuleKind::Embedding;
    }
    if last.contains("norm") || last.starts_with("ln_") || last == "ln_f" {
        return ModuleKind::Norm;
    }
    // GPT-2's Conv1D stores W as [in, out], so it is not a Linear in the contract's sense.
    if is_gpt2(model_type) && matches!(last, "c_attn" | "c_proj" | "c_fc") {
        return ModuleKind::Other;
    }
    if rank == 2 && weight.is_some_and(|w| w.dtype.is_float()) {
        return ModuleKind::Linear;
    }
    ModuleKind::Other
}

/// The tied-embedding question: does the head share the embedding's weight?
fn ties_embeddings(config: &Value) -> bool {
    config.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false)
}

/// Builds the skeleton of a dense checkpoint and marks which modules must stay dense:
/// the output head (and tied embedding), non-Linear modules, and the user's `not_convert` patterns.
pub fn skeleton(checkpoint: &Checkpoint, not_convert: &[ModulePattern]) -> Skeleton {
    let config = checkpoint.config().clone();
    let model_type = config.get("model_type").and_then(Value::as_str).unwrap_or("").to_string();
    let mut grouped: BTreeMap<String, (usize, Vec<TensorSpec>)> = BTreeMap::new();
    for (order, name) in checkpoint.tensor_names().enumerate() {
        let (module, local) = split_module_name(name);
        let spec = checkpoint.spec(name).expect("listed tensors have specs");
        let entry = grouped.entry(module.to_string()).or_insert((order, Vec::new()));
        entry.1.push(TensorSpec::new(local, spec.dtype, spec.shape.clone()));
    }
    let mut modules: Vec<(usize, Module)> = grouped
        .into_iter()
        .map(|(name, (order, tensors))| {
            let kind = classify(&model_type, &name, &tensors);
            let not_converted = match kind {
                ModuleKind::Head => Some("output head (kept dense, as transformers does)".to_string()),
                ModuleKind::Embedding if ties_embeddings(&config) => {
                    Some("embedding tied to the output head".to_string())
                }
                ModuleKind::Linear => not_convert
                    .iter()
                    .find(|p| p.matches(&name))
                    .map(|p| format!("matches modules_to_not_convert pattern `{}`", pattern_text(p))),
                ModuleKind::Other if is_gpt2(&model_type) => Some("GPT-2 Conv1D layer (W stored as [in, out])".into()),
                _ => None,
            };
            (order, Module { name, kind, tensors, not_converted })
        })
        .collect();
    modules.sort_by_key(|(order, _)| *order);
    Skeleton { model_type, config, modules: modules.into_iter().map(|(_, m)| m).collect() }
}

fn pattern_text(p: &ModulePattern) -> String {
    match p {
        ModulePattern::Name(n) => n.clone(),
        ModulePattern::Regex(r) => format!("re:{}", r.as_str().trim_start_matches("^(?:").trim_end_matches(")$")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvant_plugin_api::DType;

    fn w(shape: &[usize]) -> Vec<TensorSpec> {
        vec![TensorSpec::new("weight", DType::F32, shape)]
    }

    #[test]
    fn llama_modules_are_classified() {
        assert_eq!(classify("llama", "model.embed_tokens", &w(&[10, 4])), ModuleKind::Embedding);
        assert_eq!(classify("llama", "model.layers.0.self_attn.q_proj", &w(&[4, 4])), ModuleKind::Linear);
        assert_eq!(classify("llama", "model.layers.0.input_layernorm", &w(&[4])), ModuleKind::Norm);
        assert_eq!(classify("llama", "model.norm", &w(&[4])), ModuleKind::Norm);
        assert_eq!(classify("llama", "lm_head", &w(&[10, 4])), ModuleKind::Head);
        assert_eq!(classify("gemma3_text", "model.layers.0.self_attn.q_norm", &w(&[4])), ModuleKind::Norm);
    }

    #[test]
    fn gpt2_conv1d_is_not_a_linear() {
        assert_eq!(classify("gpt2", "transformer.h.0.attn.c_attn", &w(&[4, 12])), ModuleKind::Other);
        assert_eq!(classify("gpt2", "transformer.wte", &w(&[10, 4])), ModuleKind::Embedding);
        assert_eq!(classify("gpt2", "transformer.h.0.ln_1", &w(&[4])), ModuleKind::Norm);
    }

    #[test]
    fn unknown_types_fall_back_to_shapes() {
        assert_eq!(classify("mystery", "blocks.3.ff.w1", &w(&[8, 4])), ModuleKind::Linear);
        assert_eq!(classify("mystery", "blocks.3.scale", &w(&[8])), ModuleKind::Other);
    }

    #[test]
    fn patterns_match_names_prefixes_suffixes_and_regexes() {
        let p = |s| ModulePattern::parse(s).unwrap();
        assert!(p("model.layers.0").matches("model.layers.0.mlp.down_proj"));
        assert!(!p("model.layers.0").matches("model.layers.10.mlp.down_proj"));
        assert!(p("down_proj").matches("model.layers.3.mlp.down_proj"));
        assert!(!p("proj").matches("model.layers.3.mlp.down_proj"));
        assert!(p("re:.*\\.(q|k)_proj").matches("model.layers.1.self_attn.k_proj"));
        assert!(!p("re:.*\\.(q|k)_proj").matches("model.layers.1.self_attn.v_proj"));
        assert!(ModulePattern::parse("re:(").is_err());
    }
}
