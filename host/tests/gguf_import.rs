//! Imports the real SmolLM2-135M GGUF (fetched by scripts/fetch-test-material.sh) and checks every
//! tensor, dequantized and un-permuted into Hugging Face layout, bit for bit against what the
//! `gguf` Python package and numpy give (fixture from scripts/make-gguf-import-fixture.py).
//!
//! Skipped, with a message, when the model is not in the cache.

use std::path::PathBuf;
use std::time::Instant;

use kvant::gguf::{hf_tensor_name, unpermute_qk, GgufFile};
use kvant_gguf::{dequantize, GgmlType};
use serde_json::Value;
use sha2::{Digest, Sha256};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn cached_model() -> Option<PathBuf> {
    let cache = std::env::var_os("KVANT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/kvant"));
    let path = cache.join(MODEL);
    if path.is_file() {
        Some(path)
    } else {
        eprintln!("skipped: {} not found; run scripts/fetch-test-material.sh", path.display());
        None
    }
}

fn fixture() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2-gguf-tensors.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn header_metadata_and_tensor_infos() {
    let Some(path) = cached_model() else { return };
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.metadata().len(), 33);
    assert_eq!(f.tensors().len(), 272);
    let count = |ty: &str| f.tensors().iter().filter(|t| t.type_name == ty).count();
    assert_eq!((count("Q4_1"), count("F32"), count("Q8_0")), (210, 61, 1));
    let shape = |name: &str| f.tensor(name).unwrap().shape();
    assert_eq!(shape("token_embd.weight"), [49152, 576]);
    assert_eq!(shape("blk.0.attn_q.weight"), [576, 576]);
    assert_eq!(shape("blk.0.attn_k.weight"), [192, 576]);
    assert_eq!(shape("blk.29.ffn_down.weight"), [576, 1536]);
    assert_eq!(shape("output_norm.weight"), [576]);
    assert!(f.tensor("output.weight").is_none());

    let md = f.metadata();
    assert_eq!(md.strings("tokenizer.ggml.tokens").unwrap().unwrap().len(), 49152);
    assert_eq!(md.strings("tokenizer.ggml.merges").unwrap().unwrap().len(), 48900);
    assert_eq!(md.str("tokenizer.ggml.pre").unwrap(), Some("smollm"));

    let fx = fixture();
    let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    let expected: Vec<&str> = fx["tensors"].as_array().unwrap().iter().map(|t| t["gguf_name"].as_str().unwrap()).collect();
    assert_eq!(names, expected, "tensor order");
}

#[test]
fn hf_config_matches_the_model_card() {
    let Some(path) = cached_model() else { return };
    let c = GgufFile::open(&path).unwrap().hf_config().unwrap();
    let expect = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "rope_scaling": null,
        "vocab_size": 49152,
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "attention_bias": false,
    });
    for (k, v) in expect.as_object().unwrap() {
        assert_eq!(&c[k], v, "config.json `{k}`");
    }
}

/// Every tensor, in HF layout, hashes to what gguf-py + numpy produced; also measures the import.
#[test]
fn every_tensor_dequantizes_bit_exactly() {
    let Some(path) = cached_model() else { return };
    let fx = fixture();
    let start = Instant::now();
    let f = GgufFile::open(&path).unwrap();
    let mut elements = 0usize;
    let mut hf_layout = Vec::new();
    for t in f.tensors() {
        let ty = GgmlType::from_id(t.ggml_type).unwrap();
        let mut values = dequantize(ty, f.tensor_data(t), t.n_elements).unwrap();
        let hf = hf_tensor_name(&t.name).unwrap();
        if let Some(heads) = f.qk_permutation_heads(&hf).unwrap() {
            let shape = t.shape();
            values = unpermute_qk(&values, shape[0], shape[1..].iter().product(), heads).unwrap();
        }
        elements += values.len();
        hf_layout.push((hf, t.shape(), values));
    }
    let elapsed = start.elapsed();
    eprintln!(
        "read + dequantize + un-permute {MODEL}: {elements} values in {:.3} s ({:.0} M values/s)",
        elapsed.as_secs_f64(),
        elements as f64 / elapsed.as_secs_f64() / 1e6
    );
    assert_eq!(elements, 134_515_008);

    for ((hf, shape, values), want) in hf_layout.iter().zip(fx["tensors"].as_array().unwrap()) {
        assert_eq!(hf, want["hf_name"].as_str().unwrap());
        let want_shape: Vec<usize> = serde_json::from_value(want["shape"].clone()).unwrap();
        assert_eq!(shape, &want_shape, "{hf}");
        let first: Vec<f32> = serde_json::from_value(want["first"].clone()).unwrap();
        assert_eq!(&values[..first.len()], &first[..], "{hf}: leading values");
        let digest = Sha256::digest(bytemuck::cast_slice::<f32, u8>(values));
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, want["sha256"].as_str().unwrap(), "{hf}: sha256 of the F32 values");
    }
}
