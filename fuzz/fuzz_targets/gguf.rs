//! Any bytes as a GGUF file: container, metadata, tensor infos, the HF config and tokenizer
//! built from them.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(gguf) = kvant::gguf::GgufFile::from_bytes("fuzz.gguf", data.to_vec()) {
        for t in gguf.tensors() {
            let _ = gguf.tensor_data(t);
            if let Some(name) = kvant::gguf::hf_tensor_name(&t.name) {
                let _ = gguf.qk_permutation_heads(&name);
            }
        }
        let _ = gguf.hf_config();
        let _ = kvant::gguf_tokenizer::build(&gguf);
    }
});
