//! Any bytes as `model.safetensors.index.json` beside one valid shard.
#![no_main]

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = common::scratch().join("index");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), b"{}").unwrap();
    std::fs::write(dir.join("model-00001-of-00001.safetensors"), common::valid_safetensors()).unwrap();
    std::fs::write(dir.join("model.safetensors.index.json"), data).unwrap();
    if let Ok(ckpt) = kvant::checkpoint::Checkpoint::open(&dir) {
        common::touch_all(&ckpt);
    }
});
