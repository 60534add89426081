//! Checkpoint reading and writing against real files: round trips, malformed inputs, unsafe
//! indexes, output replacement and failing disks.

use std::fs;
use std::path::{Path, PathBuf};

use kvant::checkpoint::{save_dense, Checkpoint, CheckpointWriter, WriterOptions};
use kvant_plugin_api::{DType, Tensor, TensorSpec};
use serde_json::{json, Value};
use tempfile::TempDir;

/// A few tensors of every float dtype plus packed integers, with awkward values
/// (subnormals, negative zero, infinities, a NaN payload) that must survive bit for bit.
fn sample_tensors() -> Vec<Tensor> {
    let f32_values = [
        1.5f32,
        -0.0,
        f32::MIN_POSITIVE / 4.0,
        f32::INFINITY,
        f32::from_bits(0x7fc0_1234),
        -3.25,
    ];
    let f16_bits: Vec<u16> = vec![0x0001, 0x8000, 0x3c00, 0x7c00, 0xfbff, 0x7e01];
    let bf16_bits: Vec<u16> = vec![0x3f80, 0xff80, 0x0001, 0x7fc1, 0xc0a0, 0x8000];
    vec![
        Tensor::f32("model.embed_tokens.weight", [2, 3], &f32_values),
        Tensor::from_slice(
            "model.layers.0.mlp.up_proj.weight",
            DType::F16,
            [3, 2],
            &f16_bits,
        ),
        Tensor::from_slice(
            "model.layers.0.mlp.up_proj.bias",
            DType::BF16,
            [6],
            &bf16_bits,
        ),
        Tensor::from_slice(
            "model.layers.0.mlp.down_proj.qweight",
            DType::I32,
            [2],
            &[-7i32, 0x0777_7777],
        ),
        Tensor::from_slice(
            "model.layers.0.mlp.down_proj.weight_format",
            DType::U8,
            [],
            &[0u8],
        ),
        Tensor::from_slice("model.layers.10.norm.weight", DType::F32, [1], &[2.0f32]),
        Tensor::from_slice("lm_head.weight", DType::BF16, [0, 4], &[] as &[u16]),
    ]
}

fn sample_config() -> Value {
    // Deliberately not in sorted order: the writer must keep key order.
    json!({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 3, "a_last": null})
}

/// Serializes tensors with the safetensors crate, as the Python ecosystem's files are made.
fn reference_file(tensors: &[Tensor]) -> Vec<u8> {
    let dtype = |d: DType| match d {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::I32 => safetensors::Dtype::I32,
        DType::U8 => safetensors::Dtype::U8,
        other => panic!("no test mapping for {other}"),
    };
    let views: Vec<_> = tensors
        .iter()
        .map(|t| {
            let view =
                safetensors::tensor::TensorView::new(dtype(t.dtype), t.shape.clone(), &t.data)
                    .unwrap();
            (t.name.clone(), view)
        })
        .collect();
    safetensors::tensor::serialize(views, &None).unwrap()
}

/// A safetensors file from a literal header and data bytes, for malformed inputs.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// A model folder with a config and the given files.
fn model_dir(files: &[(&str, &[u8])]) -> TempDir {
    let dir = TempDir::new().unwrap();
    fs::write(
        dir.path().join("config.json"),
        serde_json::to_vec(&sample_config()).unwrap(),
    )
    .unwrap();
    for (name, contents) in files {
        fs::write(dir.path().join(name), contents).unwrap();
    }
    dir
}

fn open_error(dir: &Path) -> String {
    match Checkpoint::open(dir) {
        Ok(_) => panic!("{} opened although it is invalid", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_contains(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "error message lacks `{part}`:\n{message}"
        );
    }
}

fn assert_same_tensors(checkpoint: &Checkpoint, expected: &[Tensor]) {
    assert_eq!(checkpoint.len(), expected.len());
    for tensor in expected {
        let view = checkpoint.view(&tensor.name).unwrap();
        assert_eq!(view.name, tensor.name);
        assert_eq!(view.dtype, tensor.dtype, "{}", tensor.name);
        assert_eq!(view.shape, tensor.shape.as_slice(), "{}", tensor.name);
        assert_eq!(view.data, tensor.data.as_slice(), "{}", tensor.name);
        assert_eq!(checkpoint.spec(&tensor.name), Some(&tensor.spec()));
    }
}

/// Entries of a folder, sorted, to prove nothing stray (temporary folders) was left.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn specs(tensors: &[Tensor]) -> Vec<TensorSpec> {
    tensors.iter().map(Tensor::spec).collect()
}

#[test]
fn reads_reference_safetensors_bit_exact() {
    let tensors = sample_tensors();
    let dir = model_dir(&[
        ("model.safetensors", &reference_file(&tensors)),
        ("tokenizer.json", b"{}"),
    ]);
    let checkpoint = Checkpoint::open(dir.path()).unwrap();

    assert_same_tensors(&checkpoint, &tensors);
    assert_eq!(checkpoint.config(), &sample_config());
    assert_eq!(checkpoint.quantization_config(), None);
    assert_eq!(checkpoint.model_dir(), dir.path());
    assert_eq!(
        checkpoint.total_bytes(),
        tensors.iter().map(|t| t.data.len() as u64).sum::<u64>()
    );
    assert_eq!(
        checkpoint.companion_files(),
        [dir.path().join("tokenizer.json")]
    );
    let f32_view = checkpoint.view("model.embed_tokens.weight").unwrap();
    assert_eq!(f32_view.to_f32()[1].to_bits(), (-0.0f32).to_bits());
    assert!(checkpoint
        .view("model.nope")
        .unwrap_err()
        .to_string()
        .contains("no tensor named `model.nope`"));
}

#[test]
fn single_file_path_opens_with_empty_config() {
    let tensors = sample_tensors();
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("weights.safetensors");
    fs::write(&file, reference_file(&tensors)).unwrap();
    let checkpoint = Checkpoint::open(&file).unwrap();
    assert_same_tensors(&checkpoint, &tensors);
    assert_eq!(checkpoint.config(), &json!({}));
    assert!(checkpoint.companion_files().is_empty());
    assert_eq!(checkpoint.model_dir(), dir.path());
}

/// A method's extra config file lands beside config.json; names that are paths or the
/// checkpoint's own files are refused.
#[test]
fn extra_files_are_plain_names_beside_the_checkpoint() {
    let tensors = sample_tensors();
    let parent = TempDir::new().unwrap();
    let out = parent.path().join("out");
    let writer = CheckpointWriter::create(&out, specs(&tensors), WriterOptions::default()).unwrap();
    for bad in ["../escape.json", "sub/x.json", "/abs.json", "", "..", "config.json", "model.safetensors"] {
        let err = writer.write_file(bad, b"{}").unwrap_err();
        assert!(format!("{err:#}").contains(&format!("`{bad}`")), "{bad}: {err:#}");
    }
    writer.write_file("quantize_config.json", b"{\"bits\": 4}\n").unwrap();
    for tensor in &tensors {
        writer.write(&tensor.name, &tensor.data).unwrap();
    }
    writer.finish(&sample_config(), &[]).unwrap();
    assert_eq!(entries(&out), ["config.json", "model.safetensors", "quantize_config.json"]);
    assert_eq!(fs::read(out.join("quantize_config.json")).unwrap(), b"{\"bits\": 4}\n");
    assert_eq!(entries(parent.path()), ["out"]);
}

#[test]
fn round_trip_single_file_with_out_of_order_writes() {
    let tensors = sample_tensors();
    let parent = TempDir::new().unwrap();
    let out = parent.path().join("out");
    let tokenizer = parent.path().join("tokenizer.json");
    fs::write(&tokenizer, b"{\"version\": \"1.0\"}").unwrap();

    let writer = CheckpointWriter::create(&out, specs(&tensors), WriterOptions::default()).unwrap();
    assert_eq!(writer.shard_file_names(), ["model.safetensors"]);
    assert!(!out.exists(), "the output must not appear before finish");
    for tensor in tensors.iter().rev() {
        writer.write(&tensor.name, &tensor.data).unwrap();
    }
    writer
        .finish(&sample_config(), std::slice::from_ref(&tokenizer))
        .unwrap();

    assert_eq!(entries(parent.path()), ["out", "tokenizer.json"]);
    assert_eq!(
        entries(&out),
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    let config_text = fs::read_to_string(out.join("config.json")).unwrap();
    assert!(
        config_text.starts_with("{\n  \"model_type\": \"llama\",\n  \"architectures\": ["),
        "{config_text}"
    );
    assert!(
        config_text.ends_with("\"a_last\": null\n}\n"),
        "{config_text}"
    );
    assert_eq!(
        fs::read(out.join("tokenizer.json")).unwrap(),
        fs::read(&tokenizer).unwrap()
    );

    let bytes = fs::read(out.join("model.safetensors")).unwrap();
    let reference = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(reference.len(), tensors.len());
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        metadata
            .metadata()
            .as_ref()
            .unwrap()
            .get("format")
            .map(String::as_str),
        Some("pt")
    );

    let checkpoint = Checkpoint::open(&out).unwrap();
    assert_same_tensors(&checkpoint, &tensors);
    assert_eq!(checkpoint.companion_files(), [out.join("tokenizer.json")]);
    // Widest dtypes are stored first so every tensor is aligned to its element size.
    let f32_view = checkpoint.view("model.embed_tokens.weight").unwrap();
    assert!(matches!(f32_view.as_f32(), std::borrow::Cow::Borrowed(_)));
}

#[test]
fn round_trip_sharded_with_index() {
    let tensors = sample_tensors();
    let parent = TempDir::new().unwrap();
    let out = parent.path().join("sharded");
    let options = WriterOptions {
        max_shard_bytes: 16,
        ..WriterOptions::default()
    };
    let writer = CheckpointWriter::create(&out, specs(&tensors), options).unwrap();
    // embed 24 | up 12 | bias 12 | qweight 8 + format 1 + norm 4 + lm_head 0
    let shard_names = writer
        .shard_file_names()
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>();
    assert_eq!(
        shard_names,
        [
            "model-00001-of-00004.safetensors",
            "model-00002-of-00004.safetensors",
            "model-00003-of-00004.safetensors",
            "model-00004-of-00004.safetensors"
        ]
    );
    for i in [3, 0, 6, 1, 5, 2, 4] {
        writer.write(&tensors[i].name, &tensors[i].data).unwrap();
    }
    writer.finish(&sample_config(), &[]).unwrap();

    let mut expected_files = shard_names.clone();
    expected_files.extend([
        "config.json".to_string(),
        "model.safetensors.index.json".to_string(),
    ]);
    expected_files.sort();
    assert_eq!(entries(&out), expected_files);

    let index_text = fs::read_to_string(out.join("model.safetensors.index.json")).unwrap();
    let index: Value = serde_json::from_str(&index_text).unwrap();
    assert_eq!(index["metadata"]["total_size"], json!(61));
    assert_eq!(
        index["weight_map"]["model.embed_tokens.weight"],
        json!("model-00001-of-00004.safetensors")
    );
    assert_eq!(
        index["weight_map"]["lm_head.weight"],
        json!("model-00004-of-00004.safetensors")
    );
    let mapped: Vec<&String> = index["weight_map"].as_object().unwrap().keys().collect();
    let mut sorted = mapped.clone();
    sorted.sort();
    assert_eq!(
        mapped, sorted,
        "weight_map keys are sorted like transformers writes them"
    );

    let checkpoint = Checkpoint::open(&out).unwrap();
    assert_same_tensors(&checkpoint, &tensors);
    assert_eq!(checkpoint.shard_paths().count(), 4);
    assert_eq!(checkpoint.total_bytes(), 61);
}

#[test]
fn concurrent_writes_from_threads() {
    let tensors: Vec<Tensor> = (0..32)
        .map(|i| Tensor::f32(format!("layers.{i}.weight"), [64], &vec![i as f32; 64]))
        .collect();
    let parent = TempDir::new().unwrap();
    let out = parent.path().join("out");
    let options = WriterOptions {
        max_shard_bytes: 1024,
        ..WriterOptions::default()
    };
    let writer = CheckpointWriter::create(&out, specs(&tensors), options).unwrap();
    std::thread::scope(|scope| {
        for chunk in tensors.chunks(8) {
            let writer = &writer;
            scope.spawn(move || {
                chunk
                    .iter()
                    .for_each(|t| writer.write(&t.name, &t.data).unwrap())
            });
        }
    });
    writer.finish(&json!({}), &[]).unwrap();
    assert_same_tensors(&Checkpoint::open(&out).unwrap(), &tensors);
}

#[test]
fn save_dense_round_trips_and_checks_shapes() {
    let tensors = sample_tensors();
    let parent = TempDir::new().unwrap();
    save_dense(parent.path().join("dense"), &tensors, &sample_config()).unwrap();
    let checkpoint = Checkpoint::open(parent.path().join("dense")).unwrap();
    assert_same_tensors(&checkpoint, &tensors);
    assert_eq!(checkpoint.config(), &sample_config());
}

#[test]
fn write_rejects_unplanned_wrong_sized_repeated_and_misshaped_tensors() {
    let tensors = sample_tensors();
    let parent = TempDir::new().unwrap();
    let writer = CheckpointWriter::create(
        parent.path().join("out"),
        specs(&tensors),
        WriterOptions::default(),
    )
    .unwrap();
    let err = format!("{:#}", writer.write("model.extra", &[0]).unwrap_err());
    assert_contains(&err, &["`model.extra`", "not in the output plan"]);
    let err = format!("{:#}", writer.write(&tensors[0].name, &[0; 3]).unwrap_err());
    assert_contains(
        &err,
        &["`model.embed_tokens.weight`", "has 3 bytes", "24 bytes"],
    );
    writer.write(&tensors[0].name, &tensors[0].data).unwrap();
    let err = format!(
        "{:#}",
        writer
            .write(&tensors[0].name, &tensors[0].data)
            .unwrap_err()
    );
    assert_contains(&err, &["`model.embed_tokens.weight`", "written twice"]);

    let reshaped = Tensor::from_slice("x", DType::F16, [2, 3], &[0u16; 6]);
    let err = format!(
        "{:#}",
        writer
            .write_view(&tensors[1].name, &reshaped.view())
            .unwrap_err()
    );
    assert_contains(
        &err,
        &["`model.layers.0.mlp.up_proj.weight`", "[2, 3]", "[3, 2]"],
    );
}

#[test]
fn finish_names_missing_tensors_and_leaves_nothing() {
    let tensors = sample_tensors();
    let parent = TempDir::new().unwrap();
    let out = parent.path().join("out");
    let writer = CheckpointWriter::create(&out, specs(&tensors), WriterOptions::default()).unwrap();
    for tensor in &tensors[2..] {
        writer.write(&tensor.name, &tensor.data).unwrap();
    }
    let err = format!("{:#}", writer.finish(&sample_config(), &[]).unwrap_err());
    assert_contains(
        &err,
        &[
            "2 of 7 output tensors were never written",
            "`model.embed_tokens.weight`",
            "`model.layers.0.mlp.up_proj.weight`",
        ],
    );
    assert!(
        entries(parent.path()).is_empty(),
        "left behind: {:?}",
        entries(parent.path())
    );
}

#[test]
fn dropped_writer_removes_its_temporary_folder() {
    let parent = TempDir::new().unwrap();
    let writer = CheckpointWriter::create(
        parent.path().join("out"),
        specs(&sample_tensors()),
        WriterOptions::default(),
    )
    .unwrap();
    assert_eq!(entries(parent.path()).len(), 1);
    assert!(entries(parent.path())[0].starts_with(".out.kvant-tmp-"));
    drop(writer);
    assert!(entries(parent.path()).is_empty());
}

/// Size of the single-shard file the writer makes for `tensors`: header plus data.
fn single_shard_size(tensors: &[Tensor]) -> u64 {
    let scratch = TempDir::new().unwrap();
    save_dense(scratch.path().join("probe"), tensors, &json!({})).unwrap();
    fs::metadata(scratch.path().join("probe/model.safetensors"))
        .unwrap()
        .len()
}

#[test]
fn disk_full_mid_write_names_the_file_and_leaves_no_output() {
    let tensors = sample_tensors();
    let parent = TempDir::new().unwrap();
    let out = parent.path().join("out");
    let header_len = single_shard_size(&tensors) - 61;
    // Room for the header, the 24 bytes of the first tensor and half of the second.
    let options = WriterOptions {
        fail_after_bytes: Some(header_len + 30),
        ..WriterOptions::default()
    };
    let writer = CheckpointWriter::create(&out, specs(&tensors), options).unwrap();
    writer.write(&tensors[0].name, &tensors[0].data).unwrap();
    let err = format!(
        "{:#}",
        writer
            .write(&tensors[1].name, &tensors[1].data)
            .unwrap_err()
    );
    assert_contains(
        &err,
        &[
            "`model.layers.0.mlp.up_proj.weight`",
            "model.safetensors",
            "no space left on device",
            "was not created",
        ],
    );
    drop(writer);
    assert!(
        entries(parent.path()).is_empty(),
        "left behind: {:?}",
        entries(parent.path())
    );
}

#[test]
fn disk_full_while_writing_config_leaves_no_output_and_keeps_the_old_one() {
    let tensors = sample_tensors();
    let parent = TempDir::new().unwrap();
    let out = parent.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("marker"), b"old").unwrap();

    // The budget covers header and data exactly, so the first byte of config.json fails.
    let options = WriterOptions {
        force: true,
        fail_after_bytes: Some(single_shard_size(&tensors)),
        ..WriterOptions::default()
    };
    let writer = CheckpointWriter::create(&out, specs(&tensors), options).unwrap();
    for tensor in &tensors {
        writer.write(&tensor.name, &tensor.data).unwrap();
    }
    let err = format!("{:#}", writer.finish(&sample_config(), &[]).unwrap_err());
    assert_contains(&err, &["config.json", "no space left on device"]);
    assert_eq!(entries(parent.path()), ["out"]);
    assert_eq!(
        entries(&out),
        ["marker"],
        "the old output must survive a failed replacement"
    );
}

#[test]
fn existing_output_is_refused_without_force_and_replaced_with_it() {
    let tensors = sample_tensors();
    let parent = TempDir::new().unwrap();
    let out = parent.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("marker"), b"old").unwrap();

    let err = format!(
        "{:#}",
        CheckpointWriter::create(&out, specs(&tensors), WriterOptions::default()).unwrap_err()
    );
    assert_contains(&err, &["already exists", "--force"]);
    assert_eq!(entries(&out), ["marker"]);

    let options = WriterOptions {
        force: true,
        ..WriterOptions::default()
    };
    let writer = CheckpointWriter::create(&out, specs(&tensors), options).unwrap();
    assert_eq!(
        entries(&out),
        ["marker"],
        "the old output stays until the new one is complete"
    );
    for tensor in &tensors {
        writer.write(&tensor.name, &tensor.data).unwrap();
    }
    writer.finish(&sample_config(), &[]).unwrap();
    assert_eq!(entries(&out), ["config.json", "model.safetensors"]);
    assert_eq!(entries(parent.path()), ["out"]);
    assert_same_tensors(&Checkpoint::open(&out).unwrap(), &tensors);
}

#[test]
fn force_never_replaces_the_input_checkpoint() {
    let tensors = sample_tensors();
    let input = model_dir(&[("model.safetensors", &reference_file(&tensors))]);
    let options = WriterOptions {
        force: true,
        protected_paths: vec![input.path().join("model.safetensors")],
        ..WriterOptions::default()
    };
    let err = format!(
        "{:#}",
        CheckpointWriter::create(input.path(), specs(&tensors), options).unwrap_err()
    );
    assert_contains(&err, &["refusing to replace", "holds the input"]);
    assert_eq!(entries(input.path()), ["config.json", "model.safetensors"]);
}

#[test]
fn reading_and_rewriting_never_modifies_the_input() {
    let tensors = sample_tensors();
    let input = model_dir(&[
        ("model.safetensors", &reference_file(&tensors)),
        ("tokenizer.json", b"{}"),
    ]);
    let before: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(input.path())
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let bytes = fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();

    let checkpoint = Checkpoint::open(input.path()).unwrap();
    let parent = TempDir::new().unwrap();
    let specs: Vec<TensorSpec> = checkpoint
        .tensor_names()
        .map(|n| checkpoint.spec(n).unwrap().clone())
        .collect();
    let writer =
        CheckpointWriter::create(parent.path().join("copy"), specs, WriterOptions::default())
            .unwrap();
    for name in checkpoint.tensor_names() {
        writer
            .write_view(name, &checkpoint.view(name).unwrap())
            .unwrap();
    }
    writer
        .finish(checkpoint.config(), checkpoint.companion_files())
        .unwrap();
    drop(checkpoint);

    for (path, bytes) in before {
        assert_eq!(
            fs::read(&path).unwrap(),
            bytes,
            "{} changed",
            path.display()
        );
    }
    assert_same_tensors(
        &Checkpoint::open(parent.path().join("copy")).unwrap(),
        &tensors,
    );
}

#[test]
fn modules_and_prefixes_group_tensors() {
    let tensors = sample_tensors();
    let dir = model_dir(&[("model.safetensors", &reference_file(&tensors))]);
    let checkpoint = Checkpoint::open(dir.path()).unwrap();

    let mut layer0 = checkpoint.tensors_with_prefix("model.layers.0.mlp.up_proj");
    layer0.sort();
    assert_eq!(
        layer0,
        [
            "model.layers.0.mlp.up_proj.bias",
            "model.layers.0.mlp.up_proj.weight"
        ]
    );
    // `layers.1` must not match `layers.10`.
    assert!(checkpoint.tensors_with_prefix("model.layers.1").is_empty());
    assert_eq!(
        checkpoint.tensors_with_prefix("model.layers.10"),
        ["model.layers.10.norm.weight"]
    );
    assert_eq!(checkpoint.tensors_with_prefix("").len(), tensors.len());

    let modules = checkpoint.modules();
    let down = modules
        .iter()
        .find(|m| m.prefix == "model.layers.0.mlp.down_proj")
        .unwrap();
    let mut down_tensors = down.tensors.clone();
    down_tensors.sort();
    assert_eq!(
        down_tensors,
        [
            "model.layers.0.mlp.down_proj.qweight",
            "model.layers.0.mlp.down_proj.weight_format"
        ]
    );
    assert_eq!(modules.len(), 5);
    assert_eq!(
        modules.iter().map(|m| m.tensors.len()).sum::<usize>(),
        tensors.len()
    );
}

#[test]
fn malformed_safetensors_files_are_reported_with_file_and_cause() {
    let good = reference_file(&sample_tensors());
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "truncated",
            good[..good.len() - 5].to_vec(),
            vec!["past the end of the data section", "truncated"],
        ),
        ("empty", Vec::new(), vec!["truncated", "too short"]),
        ("tiny", vec![1, 2, 3], vec!["truncated", "too short"]),
        (
            "header-past-end",
            {
                let mut b = good.clone();
                b[..8].copy_from_slice(&1_000_000u64.to_le_bytes());
                b
            },
            vec!["header length 1000000 goes past the end"],
        ),
        (
            "not-json",
            raw_file("{\"a\": [", &[]),
            vec!["header is not valid JSON"],
        ),
        (
            "unknown-dtype",
            raw_file(
                r#"{"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}"#,
                &[0, 0],
            ),
            vec!["tensor `w`", "unsupported dtype `F8_E4M3`"],
        ),
        (
            "out-of-range",
            raw_file(
                r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
                &[0, 0],
            ),
            vec!["`w`", "past the end of the data section"],
        ),
        (
            "overlap",
            raw_file(
                r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#,
                &[0; 3],
            ),
            vec!["tensor `b`", "overlaps tensor `a`"],
        ),
        (
            "gap",
            raw_file(
                r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}"#,
                &[0; 6],
            ),
            vec!["gap of 2 unused bytes before tensor `b`"],
        ),
        (
            "wrong-length",
            raw_file(
                r#"{"w":{"dtype":"BF16","shape":[3],"data_offsets":[0,4]}}"#,
                &[0; 4],
            ),
            vec!["tensor `w`", "BF16", "needs 6"],
        ),
    ];
    for (label, bytes, expected) in cases {
        let dir = model_dir(&[("model.safetensors", &bytes)]);
        let err = open_error(dir.path());
        let file = dir.path().join("model.safetensors");
        let mut parts = expected.clone();
        let file_name = file.display().to_string();
        parts.push(&file_name);
        assert!(err.contains(&file_name), "{label}: {err}");
        assert_contains(&err, &parts);
    }
}

#[test]
fn config_errors_name_file_and_position() {
    let dir = model_dir(&[("model.safetensors", &reference_file(&sample_tensors()))]);
    fs::write(dir.path().join("config.json"), "{\n  \"a\": 1,\n  oops\n}").unwrap();
    assert_contains(
        &open_error(dir.path()),
        &["config.json is not valid JSON", "line 3 column 3"],
    );

    fs::write(dir.path().join("config.json"), "[1]").unwrap();
    assert_contains(
        &open_error(dir.path()),
        &["config.json must hold a JSON object"],
    );

    fs::remove_file(dir.path().join("config.json")).unwrap();
    assert_contains(
        &open_error(dir.path()),
        &["config.json", "needs its config.json"],
    );
}

#[test]
fn folder_without_weights_points_at_pytorch_bins() {
    let dir = model_dir(&[("pytorch_model.bin", b"")]);
    assert_contains(
        &open_error(dir.path()),
        &[
            "neither model.safetensors nor model.safetensors.index.json",
            "convert them to safetensors",
        ],
    );
}

/// Two shards with an index; `weight_map` can be overridden.
fn sharded_dir(weight_map: Value) -> TempDir {
    let tensors = sample_tensors();
    let dir = model_dir(&[
        ("a.safetensors", &reference_file(&tensors[..3])),
        ("b.safetensors", &reference_file(&tensors[3..])),
    ]);
    let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    dir
}

fn full_weight_map() -> serde_json::Map<String, Value> {
    sample_tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            (
                t.name.clone(),
                json!(if i < 3 {
                    "a.safetensors"
                } else {
                    "b.safetensors"
                }),
            )
        })
        .collect()
}

#[test]
fn sharded_index_reads_every_shard() {
    let dir = sharded_dir(Value::Object(full_weight_map()));
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    assert_same_tensors(&checkpoint, &sample_tensors());
    assert_eq!(
        checkpoint.shard_paths().collect::<Vec<_>>(),
        [
            dir.path().join("a.safetensors"),
            dir.path().join("b.safetensors")
        ]
    );
}

#[test]
fn index_errors_missing_shard_unknown_tensor_and_duplicates() {
    let mut map = full_weight_map();
    map.insert("lm_head.weight".into(), json!("c.safetensors"));
    let dir = sharded_dir(Value::Object(map));
    assert_contains(
        &open_error(dir.path()),
        &[
            "shard `c.safetensors`",
            "c.safetensors is missing",
            "download the complete checkpoint",
        ],
    );

    let mut map = full_weight_map();
    map.insert("ghost.weight".into(), json!("a.safetensors"));
    let dir = sharded_dir(Value::Object(map));
    assert_contains(
        &open_error(dir.path()),
        &["tensor `ghost.weight`", "a.safetensors", "no such tensor"],
    );

    let dir = sharded_dir(Value::Object(full_weight_map()));
    fs::write(
        dir.path().join("b.safetensors"),
        reference_file(&sample_tensors()[2..]),
    )
    .unwrap();
    assert_contains(
        &open_error(dir.path()),
        &[
            "tensor `model.layers.0.mlp.up_proj.bias` is stored twice",
            "a.safetensors",
            "b.safetensors",
        ],
    );

    let dir = sharded_dir(json!(["not", "a", "map"]));
    assert_contains(
        &open_error(dir.path()),
        &["model.safetensors.index.json", "no `weight_map` object"],
    );
}

#[test]
fn index_paths_escaping_the_folder_are_refused() {
    let outside = TempDir::new().unwrap();
    let secret = outside.path().join("secret.safetensors");
    fs::write(&secret, reference_file(&sample_tensors()[..1])).unwrap();

    for shard in [
        secret.display().to_string(),
        "../secret.safetensors".to_string(),
        "./../x.safetensors".to_string(),
    ] {
        let mut map = full_weight_map();
        map.insert("model.embed_tokens.weight".into(), json!(shard));
        let dir = sharded_dir(Value::Object(map));
        assert_contains(
            &open_error(dir.path()),
            &["refusing shard path", "must stay inside the model folder"],
        );
    }

    let mut map = full_weight_map();
    map.insert(
        "model.embed_tokens.weight".into(),
        json!("link.safetensors"),
    );
    let dir = sharded_dir(Value::Object(map));
    std::os::unix::fs::symlink(&secret, dir.path().join("link.safetensors")).unwrap();
    assert_contains(
        &open_error(dir.path()),
        &[
            "shard `link.safetensors`",
            "refusing",
            "is a link to",
            "outside the model folder",
        ],
    );
}

#[test]
fn files_linking_outside_the_folder_are_not_read_or_copied() {
    let outside = TempDir::new().unwrap();
    let secret_json = outside.path().join("credentials.json");
    fs::write(&secret_json, r#"{"token": "secret"}"#).unwrap();
    let weights = outside.path().join("weights.safetensors");
    fs::write(&weights, reference_file(&sample_tensors())).unwrap();

    let dir = model_dir(&[("model.safetensors", &reference_file(&sample_tensors()))]);
    std::os::unix::fs::symlink(&secret_json, dir.path().join("tokenizer.json")).unwrap();
    std::os::unix::fs::symlink(&secret_json, dir.path().join("generation_config.json")).unwrap();
    fs::write(dir.path().join("special_tokens_map.json"), "{}").unwrap();
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(
        checkpoint.companion_files(),
        [dir.path().join("special_tokens_map.json")]
    );

    fs::remove_file(dir.path().join("config.json")).unwrap();
    std::os::unix::fs::symlink(&secret_json, dir.path().join("config.json")).unwrap();
    assert_contains(
        &open_error(dir.path()),
        &["refusing", "config.json", "outside the model folder"],
    );

    let dir = model_dir(&[]);
    std::os::unix::fs::symlink(&weights, dir.path().join("model.safetensors")).unwrap();
    assert_contains(
        &open_error(dir.path()),
        &["refusing", "model.safetensors", "outside the model folder"],
    );
}

#[test]
fn checkpoint_and_writer_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Checkpoint>();
    assert_send_sync::<CheckpointWriter>();
}

#[test]
fn hugging_face_cache_snapshot_links_into_blobs_are_accepted() {
    let tensors = sample_tensors();
    let repo = TempDir::new().unwrap();
    let blobs = repo.path().join("blobs");
    let snapshot = repo.path().join("snapshots").join("0123abcd");
    fs::create_dir_all(&blobs).unwrap();
    fs::create_dir_all(&snapshot).unwrap();
    fs::write(blobs.join("f1"), reference_file(&tensors[..3])).unwrap();
    fs::write(blobs.join("f2"), reference_file(&tensors[3..])).unwrap();
    let index = json!({"metadata": {}, "weight_map": full_weight_map()});
    fs::write(blobs.join("f3"), index.to_string()).unwrap();
    fs::write(snapshot.join("config.json"), "{}").unwrap();
    for (link, blob) in [
        ("a.safetensors", "f1"),
        ("b.safetensors", "f2"),
        ("model.safetensors.index.json", "f3"),
    ] {
        std::os::unix::fs::symlink(Path::new("../../blobs").join(blob), snapshot.join(link))
            .unwrap();
    }
    assert_same_tensors(&Checkpoint::open(&snapshot).unwrap(), &tensors);
}

#[test]
fn large_tensors_stream_in_pieces_and_released_pages_read_back_the_same() {
    // 20 MiB: two pieces of the writer's 16 MiB.
    let values: Vec<f32> = (0..5 << 20).map(|i| i as f32 * 0.5 - 7.0).collect();
    let big = Tensor::f32("model.embed_tokens.weight", [5 << 10, 1 << 10], &values);
    let src = TempDir::new().unwrap();
    save_dense(src.path().join("in"), &[big.clone()], &sample_config()).unwrap();
    let checkpoint = Checkpoint::open(src.path().join("in")).unwrap();
    let view = checkpoint.view("model.embed_tokens.weight").unwrap();

    let writer = CheckpointWriter::create(src.path().join("out"), specs(&[big.clone()]), WriterOptions::default()).unwrap();
    let mut pieces = Vec::new();
    writer
        .write_view_in_pieces("model.embed_tokens.weight", &view, |piece| {
            pieces.push(piece.len());
            checkpoint.release_bytes(piece);
        })
        .unwrap();
    writer.finish(&sample_config(), &[]).unwrap();
    assert_eq!(pieces, [16 << 20, 4 << 20]);

    checkpoint.release("model.embed_tokens.weight");
    checkpoint.release_bytes(&[1, 2, 3]); // not checkpoint memory: ignored
    assert_eq!(view.data, big.data.as_slice());
    assert_same_tensors(&Checkpoint::open(src.path().join("out")).unwrap(), &[big]);
}

/// Two fixed tensors and two whose length is only known when written (bounds 200 and 10 elements).
fn variable_plan() -> (Vec<TensorSpec>, Vec<Tensor>) {
    let state = br#"{"quant_type": "nf4", "nested_offset": 0.49454465508461}"#.to_vec();
    let written = vec![
        Tensor::f32("m.weight", [2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        Tensor { name: "m.weight.quant_state".into(), dtype: DType::U8, shape: vec![state.len()], data: state },
        Tensor::from_slice("m.scales", DType::F16, [3], &[0x3c00u16, 0x4000, 0x4200]),
        Tensor::from_slice("m.zeros", DType::U8, [5], &[1u8, 2, 3, 4, 5]),
    ];
    let specs = vec![
        written[0].spec(),
        TensorSpec::variable("m.weight.quant_state", DType::U8, 200),
        TensorSpec::variable("m.scales", DType::F16, 10),
        written[3].spec(),
    ];
    (specs, written)
}

#[test]
fn variable_length_tensors_are_settled_at_finish_without_gaps() {
    let (specs, tensors) = variable_plan();
    for max_shard_bytes in [u64::MAX, 64] {
        let parent = TempDir::new().unwrap();
        let out = parent.path().join("out");
        let options = WriterOptions { max_shard_bytes, ..WriterOptions::default() };
        let writer = CheckpointWriter::create(&out, specs.clone(), options).unwrap();
        // Planned with their bounds until written.
        assert_eq!(writer.data_bytes(), 24 + 200 + 20 + 5);
        for t in tensors.iter().rev() {
            writer.write(&t.name, &t.data).unwrap();
        }
        assert_eq!(writer.settled_len("m.weight.quant_state"), Some(tensors[1].data.len() as u64));
        assert_eq!(writer.settled_len("m.scales"), Some(6));
        assert_eq!(writer.settled_len("m.weight"), None);
        let total = 24 + tensors[1].data.len() as u64 + 6 + 5;
        assert_eq!(writer.data_bytes(), total);
        let shards = writer.shard_file_names().len();
        writer.finish(&sample_config(), &[]).unwrap();

        let checkpoint = Checkpoint::open(&out).unwrap();
        assert_same_tensors(&checkpoint, &tensors);
        assert_eq!(checkpoint.total_bytes(), total);
        // The safetensors crate (what transformers loads with) accepts every shard: no gap
        // between tensors, nothing after the last one.
        for path in checkpoint.shard_paths() {
            let bytes = fs::read(path).unwrap();
            safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        }
        if shards > 1 {
            let index: Value = serde_json::from_slice(&fs::read(out.join("model.safetensors.index.json")).unwrap()).unwrap();
            assert_eq!(index["metadata"]["total_size"], json!(total));
        }
    }
}

#[test]
fn variable_length_tensors_must_fit_their_bound_in_whole_elements() {
    let (specs, _) = variable_plan();
    let parent = TempDir::new().unwrap();
    let writer = CheckpointWriter::create(parent.path().join("out"), specs, WriterOptions::default()).unwrap();
    let err = format!("{:#}", writer.write("m.weight.quant_state", &[b' '; 201]).unwrap_err());
    assert_contains(&err, &["`m.weight.quant_state`", "201 bytes", "up to 200 bytes"]);
    let err = format!("{:#}", writer.write("m.scales", &[0; 3]).unwrap_err());
    assert_contains(&err, &["`m.scales`", "whole F16 elements"]);
    // A refused write leaves the tensor writable.
    writer.write("m.scales", &[0; 4]).unwrap();
    let view = Tensor { name: "x".into(), dtype: DType::U8, shape: vec![3, 1], data: vec![0; 3] };
    let err = format!("{:#}", writer.write_view("m.weight.quant_state", &view.view()).unwrap_err());
    assert_contains(&err, &["`m.weight.quant_state`", "[3, 1]"]);
}

#[test]
fn resumed_writer_settles_lengths_from_the_earlier_run() {
    use kvant::checkpoint::Resumable;
    let (specs, tensors) = variable_plan();
    let parent = TempDir::new().unwrap();
    let reference = parent.path().join("reference");
    let writer = CheckpointWriter::create(&reference, specs.clone(), WriterOptions::default()).unwrap();
    for t in &tensors {
        writer.write(&t.name, &t.data).unwrap();
    }
    writer.finish(&sample_config(), &[]).unwrap();

    let out = parent.path().join("out");
    let dir = parent.path().join(".out.partial");
    let resumable = |written: &[&str], lengths: &[(&str, u64)]| WriterOptions {
        resumable: Some(Resumable {
            dir: dir.clone(),
            written: written.iter().map(|s| s.to_string()).collect(),
            lengths: lengths.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            scratch: vec![],
        }),
        ..WriterOptions::default()
    };
    let first = CheckpointWriter::create(&out, specs.clone(), resumable(&[], &[])).unwrap();
    first.write(&tensors[1].name, &tensors[1].data).unwrap();
    first.write(&tensors[0].name, &tensors[0].data).unwrap();
    first.sync_data().unwrap();
    let len = first.settled_len(&tensors[1].name).unwrap();
    drop(first);

    let err = CheckpointWriter::create(&out, specs.clone(), resumable(&["m.weight", "m.weight.quant_state"], &[])).unwrap_err();
    assert_contains(&format!("{err:#}"), &["length of `m.weight.quant_state`", "cannot resume"]);
    let second =
        CheckpointWriter::create(&out, specs, resumable(&["m.weight", "m.weight.quant_state"], &[("m.weight.quant_state", len)]))
            .unwrap();
    second.write(&tensors[2].name, &tensors[2].data).unwrap();
    second.write(&tensors[3].name, &tensors[3].data).unwrap();
    second.finish(&sample_config(), &[]).unwrap();
    assert_eq!(fs::read(out.join("model.safetensors")).unwrap(), fs::read(reference.join("model.safetensors")).unwrap());
}
