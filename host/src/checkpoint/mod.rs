//! Hugging Face checkpoints on disk: reading memory-mapped safetensors shards with their
//! `config.json`, and writing new ones shard by shard, crash-safe.

mod header;
mod reader;
mod writer;

pub use reader::{split_module_name, Checkpoint, ModuleTensors};
pub use writer::{save_dense, CheckpointWriter, Resumable, WriterOptions, DEFAULT_MAX_SHARD_BYTES};

/// The model configuration file of a Hugging Face folder.
pub const CONFIG_FILE: &str = "config.json";
/// The weights file of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The file mapping each tensor to its shard in a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
