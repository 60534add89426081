//! The parts of a Hugging Face `config.json` that the Llama-family forward pass needs.

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Architecture hyper-parameters of a Llama-family decoder (llama, mistral, qwen2, smollm).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// `model_type` from the config (`llama`, `mistral`, `qwen2`...).
    pub model_type: String,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's gate/up projections.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding and of the LM head).
    pub vocab_size: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f32,
    /// Base of the rotary frequencies.
    pub rope_theta: f64,
    /// Optional frequency rescaling.
    pub rope_scaling: RopeScaling,
    /// Whether the LM head reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// Mistral's sliding attention window, in tokens; `None` for full causal attention.
    pub sliding_window: Option<usize>,
}

/// The `rope_scaling` variants the forward pass implements.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// No scaling (`rope_scaling` absent, null, or of type `default`).
    None,
    /// Positions divided by `factor` (all frequencies divided by it).
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2"];

impl LlamaConfig {
    /// Reads the configuration from a parsed `config.json`.
    pub fn from_json(cfg: &Value) -> Result<LlamaConfig> {
        let model_type = opt_str(cfg, "model_type")?.unwrap_or("llama").to_string();
        if !SUPPORTED.contains(&model_type.as_str()) {
            bail!(
                "model_type `{model_type}` is not a Llama-family decoder the forward pass supports ({})",
                SUPPORTED.join(", ")
            );
        }
        let act = opt_str(cfg, "hidden_act")?.unwrap_or("silu");
        if act != "silu" {
            bail!("hidden_act `{act}` is not supported (only silu)");
        }
        let hidden_size = usize_key(cfg, "hidden_size")?;
        let num_heads = usize_key(cfg, "num_attention_heads")?;
        if num_heads == 0 {
            bail!("config.json: `num_attention_heads` must be at least 1, found 0");
        }
        let num_kv_heads = opt_usize(cfg, "num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match opt_usize(cfg, "head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    bail!("hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}");
                }
                hidden_size / num_heads
            }
        };
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!("num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}");
        }
        if head_dim % 2 != 0 {
            bail!("head_dim {head_dim} must be even for rotary embeddings");
        }
        // Qwen2 configs carry a sliding_window that only applies with use_sliding_window.
        let sliding_window = if model_type == "qwen2" {
            if opt_bool(cfg, "use_sliding_window")? == Some(true) {
                bail!("qwen2 with use_sliding_window = true is not supported");
            }
            None
        } else {
            opt_usize(cfg, "sliding_window")?
        };
        // Out-of-range values would not fail anywhere: the forward pass would quietly give NaN.
        let rms_norm_eps = opt_f64(cfg, "rms_norm_eps")?.unwrap_or(1e-6);
        if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
            bail!("config.json: `rms_norm_eps` must be a non-negative number, found {rms_norm_eps}");
        }
        let rope_theta = opt_f64(cfg, "rope_theta")?.unwrap_or(10000.0);
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            bail!("config.json: `rope_theta` must be a positive number, found {rope_theta}");
        }
        if sliding_window == Some(0) {
            bail!("config.json: `sliding_window` must be at least 1 (or null), found 0");
        }
        Ok(LlamaConfig {
            model_type,
            hidden_size,
            intermediate_size: usize_key(cfg, "intermediate_size")?,
            num_layers: usize_key(cfg, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: usize_key(cfg, "vocab_size")?,
            rms_norm_eps: rms_norm_eps as f32,
            rope_theta,
            rope_scaling: RopeScaling::from_json(cfg.get("rope_scaling"))?,
            tie_word_embeddings: opt_bool(cfg, "tie_word_embeddings")?.unwrap_or(false),
            sliding_window,
        })
    }

    /// Inverse rotary frequencies, one per pair of head dimensions, after `rope_scaling`.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        (0..self.head_dim / 2)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf(2.0 * i as f64 / d);
                self.rope_scaling.apply(f)
            })
            .collect()
    }
}

impl RopeScaling {
    fn from_json(v: Option<&Value>) -> Result<RopeScaling> {
        let Some(obj) = v.filter(|v| !v.is_null()) else {
            return Ok(RopeScaling::None);
        };
        if !obj.is_object() {
            bail!("config.json: `rope_scaling` must be an object or null, found {obj}");
        }
        // Older configs name the variant `type`, newer ones `rope_type`.
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |key: &str| -> Result<f64> {
            obj.get(key)
                .and_then(Value::as_f64)
                .with_context(|| format!("rope_scaling of type `{kind}` lacks numeric `{key}`"))
        };
        Ok(match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: num("factor")? },
            "llama3" => RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            },
            other => bail!("rope_scaling type `{other}` is not supported (default, linear, llama3)"),
        })
    }

    fn apply(&self, inv_freq: f64) -> f64 {
        match *self {
            RopeScaling::None => inv_freq,
            RopeScaling::Linear { factor } => inv_freq / factor,
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                // Long wavelengths (beyond the original context) are stretched by `factor`, short
                // ones kept, and the band between interpolated smoothly.
                let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
                let low_freq_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_freq_wavelen = original_max_position_embeddings / high_freq_factor;
                if wavelen < high_freq_wavelen {
                    inv_freq
                } else if wavelen > low_freq_wavelen {
                    inv_freq / factor
                } else {
                    let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                }
            }
        }
    }
}

/// An optional key of the given JSON type: absent or null is `None`; any other type is an error
/// naming the key, never a silent fall back to the default.
fn opt_typed<'a, T>(cfg: &'a Value, key: &str, expected: &str, read: impl Fn(&'a Value) -> Option<T>) -> Result<Option<T>> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => read(v).map(Some).with_context(|| format!("config.json: `{key}` must be {expected}, found {v}")),
    }
}

fn opt_usize(cfg: &Value, key: &str) -> Result<Option<usize>> {
    opt_typed(cfg, key, "a non-negative integer", |v| v.as_u64().and_then(|n| usize::try_from(n).ok()))
}

fn opt_f64(cfg: &Value, key: &str) -> Result<Option<f64>> {
    opt_typed(cfg, key, "a number", Value::as_f64)
}

fn opt_bool(cfg: &Value, key: &str) -> Result<Option<bool>> {
    opt_typed(cfg, key, "true or false", Value::as_bool)
}

fn opt_str<'a>(cfg: &'a Value, key: &str) -> Result<Option<&'a str>> {
    opt_typed(cfg, key, "a string", Value::as_str)
}

fn usize_key(cfg: &Value, key: &str) -> Result<usize> {
    opt_usize(cfg, key)?.with_context(|| format!("config.json lacks `{key}`"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
               "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": null})
    }

    #[test]
    fn reads_defaults_and_derived_head_dim() {
        let c = LlamaConfig::from_json(&base()).unwrap();
        assert_eq!((c.head_dim, c.num_kv_heads, c.tie_word_embeddings), (16, 2, false));
        assert_eq!(c.rope_scaling, RopeScaling::None);
        let f = c.inv_freq();
        assert_eq!(f.len(), 8);
        assert!((f[0] - 1.0).abs() < 1e-15 && (f[1] - 10000f64.powf(-2.0 / 16.0)).abs() < 1e-15);
    }

    #[test]
    fn rejects_unsupported_models() {
        let mut c = base();
        c["model_type"] = json!("gpt2");
        assert!(LlamaConfig::from_json(&c).is_err());
        let mut c = base();
        c["num_key_value_heads"] = json!(3);
        assert!(LlamaConfig::from_json(&c).is_err());
        let mut c = base();
        c["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        assert!(LlamaConfig::from_json(&c).is_err());
    }

    #[test]
    fn wrongly_typed_keys_are_errors_not_defaults() {
        for (key, value, expected) in [
            ("rms_norm_eps", json!("1e-5"), "config.json: `rms_norm_eps` must be a number, found \"1e-5\""),
            ("tie_word_embeddings", json!("yes"), "config.json: `tie_word_embeddings` must be true or false, found \"yes\""),
            ("model_type", json!(7), "config.json: `model_type` must be a string, found 7"),
            ("hidden_size", json!(-64), "config.json: `hidden_size` must be a non-negative integer, found -64"),
        ] {
            let mut c = base();
            c[key] = value;
            assert_eq!(LlamaConfig::from_json(&c).unwrap_err().to_string(), expected);
        }
        for (key, value, expected) in [
            ("num_attention_heads", json!(0), "config.json: `num_attention_heads` must be at least 1, found 0"),
            ("rope_theta", json!(0.0), "config.json: `rope_theta` must be a positive number, found 0"),
            ("rms_norm_eps", json!(-1.0), "config.json: `rms_norm_eps` must be a non-negative number, found -1"),
        ] {
            let mut c = base();
            c[key] = value;
            assert_eq!(LlamaConfig::from_json(&c).unwrap_err().to_string(), expected, "out of range: {key}");
        }
        let mut c = base();
        c["rope_theta"] = Value::Null;
        assert_eq!(LlamaConfig::from_json(&c).unwrap().rope_theta, 10000.0, "null means absent");
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let mut c = base();
        c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
        c["rope_theta"] = json!(500000.0);
        let scaled = LlamaConfig::from_json(&c).unwrap();
        let mut plain = scaled.clone();
        plain.rope_scaling = RopeScaling::None;
        let (s, p) = (scaled.inv_freq(), plain.inv_freq());
        // Wavelength 2*pi < 64/4: unchanged; the lowest frequency (wavelength >> 64): divided by 8.
        assert_eq!(s[0], p[0]);
        assert!((s[7] - p[7] / 8.0).abs() < 1e-18);
        // In between, the result lies between the two.
        for i in 0..8 {
            assert!(s[i] <= p[i] && s[i] >= p[i] / 8.0 - 1e-18);
        }
    }
}
