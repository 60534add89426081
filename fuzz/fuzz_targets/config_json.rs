//! Any bytes as `config.json` beside valid weights; then the model config and skeleton built from it.
#![no_main]

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = common::scratch().join("config");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), common::valid_safetensors()).unwrap();
    std::fs::write(dir.join("config.json"), data).unwrap();
    if let Ok(ckpt) = kvant::checkpoint::Checkpoint::open(&dir) {
        let _ = kvant::model::LlamaConfig::from_json(ckpt.config());
        common::touch_all(&ckpt);
    }
});
