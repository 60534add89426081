//! A private scratch folder per fuzzing process: the checkpoint reader works on files.
// Each target compiles this module on its own and uses part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

/// The scratch folder (in /dev/shm when there is one: the fuzzer writes on every input).
pub fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = PathBuf::from("/dev/shm");
        let base = if shm.is_dir() { shm } else { std::env::temp_dir() };
        let dir = base.join(format!("kvant-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        dir
    })
}

/// A valid one-tensor safetensors file: `w`, F32, shape [2, 2].
pub fn valid_safetensors() -> Vec<u8> {
    let header = br#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 16]);
    bytes
}

/// Reads every tensor of an opened checkpoint, so views and conversions see the parsed offsets.
pub fn touch_all(ckpt: &kvant::checkpoint::Checkpoint) {
    for name in ckpt.tensor_names().map(str::to_string).collect::<Vec<_>>() {
        if let Ok(view) = ckpt.view(&name) {
            let _ = view.to_f32();
        }
    }
    let _ = kvant::arch::skeleton(ckpt, &[]);
}
