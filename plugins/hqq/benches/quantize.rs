//! Time to quantize SmolLM2-135M's 210 Linear layers at 4-bit g64 (axis 1, F32), kvant against
//! the hqq library in the same run.
//!
//! `cargo bench -p kvant-hqq` reads the model from `$KVANT_HQQ_BENCH_MODEL` (default
//! `/work/dev-model/model.safetensors`, the F32 SmolLM2 import) or, if absent, synthesises Gaussian
//! layers of SmolLM2's shapes (30 x q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536).
//! The reference runs with `$KVANT_PYREF` (default `/work/pyref/bin/python`) on the same file;
//! it is skipped for synthetic layers or when that Python is missing.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use kvant_hqq::format::Layout;
use kvant_hqq::solver::SolverParams;
use safetensors::SafeTensors;

fn synthetic() -> Vec<(usize, usize, Vec<f32>)> {
    let shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)];
    let mut state = 1u64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    };
    (0..30)
        .flat_map(|_| shapes)
        .map(|(o, i)| {
            let w = (0..o * i).map(|_| 0.1 * (-2.0 * next().ln()).sqrt() * (std::f32::consts::TAU * next()).cos()).collect();
            (o, i, w)
        })
        .collect()
}

/// CPU seconds this process has used (user + system), from /proc; 0 where unavailable.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = rest.split_whitespace().skip(11).take(2).filter_map(|v| v.parse().ok()).collect();
    f.iter().sum::<f64>() / 100.0
}

fn main() {
    let path = std::env::var("KVANT_HQQ_BENCH_MODEL").unwrap_or_else(|_| "/work/dev-model/model.safetensors".into());
    let bytes = std::fs::read(&path).ok();
    let layers: Vec<(usize, usize, Vec<f32>)> = match &bytes {
        Some(b) => {
            let st = SafeTensors::deserialize(b).expect("model file is not safetensors");
            let mut names: Vec<&String> = st.names().into_iter().filter(|n| n.ends_with("_proj.weight")).collect();
            names.sort();
            names
                .into_iter()
                .map(|n| {
                    let t = st.tensor(n).unwrap();
                    let w = t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                    (t.shape()[0], t.shape()[1], w)
                })
                .collect()
        }
        None => synthetic(),
    };
    let source = if bytes.is_some() { path.as_str() } else { "synthetic Gaussian layers" };
    println!("{} layers from {source}, {} threads", layers.len(), rayon::current_num_threads());

    let params = SolverParams { nbits: 4, round_zero: true, ..Default::default() };
    let (mut best, mut cpu) = (f64::INFINITY, 0.0);
    for _ in 0..3 {
        let (start, cpu_start) = (Instant::now(), cpu_seconds());
        for (out, inp, w) in &layers {
            let l = Layout::new(*out, *inp, 4, 64, 1).unwrap();
            std::hint::black_box(l.quantize(w, &params));
        }
        let wall = start.elapsed().as_secs_f64();
        if wall < best {
            (best, cpu) = (wall, cpu_seconds() - cpu_start);
        }
    }
    println!("kvant: {best:.3} s wall, {cpu:.2} s CPU (best of 3)");

    let python = std::env::var("KVANT_PYREF").unwrap_or_else(|_| "/work/pyref/bin/python".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench-reference.py");
    if bytes.is_none() || !Path::new(&python).exists() {
        println!("hqq reference: skipped");
        return;
    }
    let out = Command::new(&python).arg(script).arg(&path).output().expect("cannot run the reference");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |i: usize| text.split_whitespace().nth(i).and_then(|s| s.parse::<f64>().ok());
    match (field(1), field(3)) {
        (Some(reference), Some(ref_cpu)) => println!(
            "hqq 0.2.8: {reference:.3} s wall, {ref_cpu:.2} s CPU; kvant is {:.1}x faster (wall), {:.1}x (CPU)",
            reference / best,
            ref_cpu / cpu
        ),
        _ => println!("hqq reference failed: {text}{}", String::from_utf8_lossy(&out.stderr)),
    }
}
