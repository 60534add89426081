//! Any bytes as `model.safetensors` of a folder with a valid config.json.
#![no_main]

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = common::scratch().join("file");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), b"{\"model_type\":\"llama\"}").unwrap();
    std::fs::write(dir.join("model.safetensors"), data).unwrap();
    if let Ok(ckpt) = kvant::checkpoint::Checkpoint::open(&dir) {
        common::touch_all(&ckpt);
    }
});
