//! The foundation issue's figures: `kvant quantize` of a 1 GiB F32 checkpoint with `rtn` 4-bit,
//! group 128 (throughput and peak resident memory), and the host's overhead per plugin call
//! (the same quantize + dequantize calls in-process vs through the loaded plugin library).
//!
//! Run with `scripts/bench-foundation.sh`, which builds the release binaries first.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use kvant::checkpoint::{Checkpoint, CheckpointWriter, WriterOptions};
use kvant::registry::open_plugin;
use kvant_plugin_api::dense::relative_error;
use kvant_plugin_api::{DType, ModuleTensors, QuantMethod, TensorSpec, TensorView};
use serde_json::{json, Map, Value};

/// Llama-3.2-3B layer shapes, two layers; the tied embedding's vocabulary fills the file to 1 GiB.
const HIDDEN: usize = 3072;
const INTERMEDIATE: usize = 8192;
const KV: usize = 1024;
const LAYERS: usize = 2;

fn tensor_specs() -> Vec<TensorSpec> {
    let mut linears = Vec::new();
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj", [HIDDEN, HIDDEN]),
            ("self_attn.k_proj", [KV, HIDDEN]),
            ("self_attn.v_proj", [KV, HIDDEN]),
            ("self_attn.o_proj", [HIDDEN, HIDDEN]),
            ("mlp.gate_proj", [INTERMEDIATE, HIDDEN]),
            ("mlp.up_proj", [INTERMEDIATE, HIDDEN]),
            ("mlp.down_proj", [HIDDEN, INTERMEDIATE]),
        ] {
            linears.push(TensorSpec::new(format!("{p}.{name}.weight"), DType::F32, shape));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            linears.push(TensorSpec::new(format!("{p}.{norm}.weight"), DType::F32, [HIDDEN]));
        }
    }
    linears.push(TensorSpec::new("model.norm.weight", DType::F32, [HIDDEN]));
    let used: usize = linears.iter().map(TensorSpec::numel).sum();
    let vocab = ((1usize << 28) - used) / HIDDEN;
    let mut specs = vec![TensorSpec::new("model.embed_tokens.weight", DType::F32, [vocab, HIDDEN])];
    specs.extend(linears);
    specs
}

/// Writes the checkpoint once; later runs reuse it.
fn ensure_checkpoint(dir: &Path) -> u64 {
    let specs = tensor_specs();
    let vocab = specs[0].shape[0];
    if !dir.join("model.safetensors").is_file() {
        eprintln!("writing the 1 GiB benchmark checkpoint to {} ...", dir.display());
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        let writer = CheckpointWriter::create(dir, specs.clone(), WriterOptions { force: true, ..Default::default() }).unwrap();
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for s in &specs {
            let values = weights(s.numel(), &mut seed, if s.shape.len() == 1 { 1.0 } else { 0.02 });
            writer.write(&s.name, bytemuck::cast_slice(&values)).unwrap();
        }
        let config = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HIDDEN / 128,
            "num_key_value_heads": KV / 128,
            "vocab_size": vocab,
            "tie_word_embeddings": true,
            "torch_dtype": "float32",
        });
        writer.finish(&config, &[]).unwrap();
    }
    std::fs::metadata(dir.join("model.safetensors")).unwrap().len()
}

/// Roughly Gaussian values (sum of four uniforms) around `mean`, spread 0.02 for weights.
fn weights(n: usize, seed: &mut u64, mean: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let mut acc = 0.0;
            for _ in 0..4 {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                acc += (*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            if mean == 1.0 { 1.0 + 0.1 * acc } else { 0.035 * acc }
        })
        .collect()
}

struct Run {
    seconds: f64,
    /// User + system CPU time: on a loaded machine, wall time says more about the neighbours.
    cpu: f64,
    peak_mib: f64,
}

/// One `kvant quantize` under `/usr/bin/time -v`.
fn quantize_once(root: &Path, model: &Path, out: &Path) -> Run {
    let kvant = root.join("target/release/kvant");
    let started = Instant::now();
    let output = Command::new("/usr/bin/time")
        .arg("-v")
        .arg(&kvant)
        .args(["quantize", "-q", "--force", "--method", "rtn", "--set", "bits=4", "--set", "group_size=128", "-o"])
        .arg(out)
        .arg(model)
        .arg("--registry")
        .arg(root.join("registry.toml"))
        .output()
        .expect("run /usr/bin/time (apt-get install time)");
    let seconds = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kvant quantize failed:\n{stderr}");
    let field = |name: &str| -> f64 {
        stderr
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("/usr/bin/time -v reports no `{name}`"))
    };
    let cpu = field("User time (seconds):") + field("System time (seconds):");
    Run { seconds, cpu, peak_mib: field("Maximum resident set size (kbytes):") / 1024.0 }
}

/// User + system CPU seconds of this process so far (all threads).
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF always exists.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let cache = root.join(".cache/kvant/bench");
    let model = cache.join("llama-1gib-f32");
    let out = cache.join("llama-1gib-rtn4");
    let bytes = ensure_checkpoint(&model);
    let rounds: usize = std::env::var("KVANT_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("checkpoint: {} ({:.3} GB, {threads} threads)", model.display(), bytes as f64 / 1e9);

    // End to end; the first run also warms the page cache.
    let mut runs = Vec::new();
    for i in 0..=rounds {
        let r = quantize_once(&root, &model, &out);
        println!(
            "  kvant quantize run {i}: {:.3} s, {:.2} GB/s, {:.2} s CPU, peak RSS {:.0} MiB{}",
            r.seconds,
            bytes as f64 / 1e9 / r.seconds,
            r.cpu,
            r.peak_mib,
            if i == 0 { " (warm-up, not counted)" } else { "" }
        );
        if i > 0 {
            runs.push(r);
        }
    }
    std::fs::remove_dir_all(&out).ok();
    let secs = median(runs.iter().map(|r| r.seconds).collect());
    let peak = runs.iter().map(|r| r.peak_mib).fold(0f64, f64::max);
    let cpu = median(runs.iter().map(|r| r.cpu).collect());
    println!("end to end: median {secs:.3} s = {:.2} GB/s of input weights; peak RSS (max) {peak:.0} MiB", bytes as f64 / 1e9 / secs);
    println!(
        "  median CPU {cpu:.2} s: {:.2} GB/s if the {threads} cores were all ours (check `uptime`: others share them)",
        bytes as f64 / 1e9 / (cpu / threads as f64)
    );

    // Per-call overhead: what the lifecycle does per module (quantize, then dequantize for the
    // reconstruction error), through the rlib and through the loaded library.
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().ok();
    let lib = root.join("target/release/libkvant_rtn.so");
    let client = open_plugin(&lib, threads).unwrap_or_else(|e| panic!("{}: {e}", lib.display())).remove(0);
    let options: Map<String, Value> = json!({"bits": 4, "group_size": 128}).as_object().unwrap().clone();
    let config = client.validate_config(&options).expect("valid options");
    let checkpoint = Checkpoint::open(&model).unwrap();
    let skeleton = kvant::arch::skeleton(&checkpoint, &[]);
    let plan = client.plan(&skeleton, &config).unwrap();
    let modules: Vec<(&kvant_plugin_api::ModulePlan, Vec<TensorView<'_>>)> = plan
        .modules
        .iter()
        .map(|p| {
            let w = checkpoint.view(&format!("{}.weight", p.name)).unwrap();
            (p, vec![TensorView { name: "weight", ..w }])
        })
        .collect();
    let weights: usize = modules.iter().map(|(p, _)| p.shape.0 * p.shape.1).sum();
    let rtn = kvant_rtn::Rtn;
    // Each side returns the seconds spent in quantize and in dequantize + error.
    let in_process = || {
        let mut t = [0.0; 4];
        for (p, views) in &modules {
            let (started, cpu) = (Instant::now(), cpu_seconds());
            let q = rtn.quantize(&ModuleTensors { plan: p, tensors: views }, None, &config).unwrap();
            t[0] += started.elapsed().as_secs_f64();
            t[2] += cpu_seconds() - cpu;
            let (started, cpu) = (Instant::now(), cpu_seconds());
            let qv: Vec<TensorView<'_>> = q.tensors.iter().map(|t| t.view()).collect();
            let back = rtn.dequantize(&ModuleTensors { plan: p, tensors: &qv }, &config).unwrap();
            std::hint::black_box(relative_error(&back, &views[0].as_f32()));
            t[1] += started.elapsed().as_secs_f64();
            t[3] += cpu_seconds() - cpu;
        }
        t
    };
    // As the lifecycle calls the plugin: the packed tensors stay lent in the plugin's memory.
    let through_plugin = || {
        let mut t = [0.0; 4];
        for (p, views) in &modules {
            let (started, cpu) = (Instant::now(), cpu_seconds());
            let q = client.quantize_lent(p, views, None, &config).unwrap();
            t[0] += started.elapsed().as_secs_f64();
            t[2] += cpu_seconds() - cpu;
            let (started, cpu) = (Instant::now(), cpu_seconds());
            let qv = q.views();
            let error = client.dequantize_with(p, &qv, &config, |back| relative_error(back, &views[0].as_f32()));
            std::hint::black_box(error.unwrap());
            t[1] += started.elapsed().as_secs_f64();
            t[3] += cpu_seconds() - cpu;
        }
        t
    };
    in_process();
    through_plugin();
    // Alternate, so that both sides see the same machine load, and swap which goes first in
    // every other pair, so that neither always finds the other's leftovers (freed memory, warm
    // caches); compare each pair.
    let pairs = 2 * rounds + 1;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..pairs {
        if i % 2 == 0 {
            a.push(in_process());
            b.push(through_plugin());
        } else {
            b.push(through_plugin());
            a.push(in_process());
        }
    }
    println!(
        "quantize, then dequantize + error (as the lifecycle does), of {} modules ({:.1} M weights), {pairs} alternating pairs:",
        modules.len(),
        weights as f64 / 1e6
    );
    // Wall time, and the CPU time of the whole process (every thread, both pools), which the
    // other processes of a shared machine disturb far less.
    let phases: [(&str, fn(&[f64; 4]) -> f64); 6] = [
        ("quantize", |t| t[0]),
        ("dequantize + error", |t| t[1]),
        ("both", |t| t[0] + t[1]),
        ("quantize, CPU", |t| t[2]),
        ("deq. + error, CPU", |t| t[3]),
        ("both, CPU", |t| t[2] + t[3]),
    ];
    for (name, phase) in phases {
        let (x, y): (Vec<f64>, Vec<f64>) = (a.iter().map(phase).collect(), b.iter().map(phase).collect());
        let ratios = x.iter().zip(&y).map(|(x, y)| y / x).collect();
        let best = y.iter().cloned().fold(f64::INFINITY, f64::min) / x.iter().cloned().fold(f64::INFINITY, f64::min);
        println!(
            "  {name:<19} in-process {:.3} s, plugin {:.3} s (medians); host overhead: median of pair ratios {:+.2}%, best vs best {:+.2}%",
            median(x),
            median(y),
            (median(ratios) - 1.0) * 100.0,
            (best - 1.0) * 100.0
        );
    }
}
