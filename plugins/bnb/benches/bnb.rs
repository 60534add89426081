//! kvant-bnb against bitsandbytes on one 4096x4096 matrix, measured in the same run.
//!
//! `cargo bench -p kvant-bnb`. bitsandbytes' side runs `scripts/bench-bitsandbytes.py` with the Python
//! named by `KVANT_BNB_PYTHON` (default `/work/pyref/bin/python`); without it only kvant's figures print.

use std::process::Command;
use std::time::Instant;

use kvant_bnb::double_quant;
use kvant_bnb::forward::{self, Weight4};
use kvant_bnb::four_bit::{self, QuantType};
use kvant_bnb::input::Floats;
use kvant_bnb::int8;
use kvant_plugin_api::dense::linear_forward;
use kvant_plugin_api::DType;
use serde_json::Value;

const N: usize = 4096;

fn median_secs(runs: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up: page faults, lazy tables, thread pool
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

/// Normal-looking weights from a fixed xorshift stream (sum of four uniforms).
fn weights(n: usize, scale: f32) -> Vec<f32> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut uniform = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    (0..n).map(|_| (uniform() + uniform() + uniform() + uniform()) * scale * 1.73).collect()
}

fn bitsandbytes_figures() -> Option<Value> {
    let python = std::env::var("KVANT_BNB_PYTHON").unwrap_or_else(|_| "/work/pyref/bin/python".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench-bitsandbytes.py");
    let out = Command::new(python).arg(script).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().rev().find_map(|l| serde_json::from_str(l).ok())
}

fn row(what: &str, kvant: f64, reference: Option<f64>, against: &str) {
    match reference {
        Some(r) => println!("{what:<44} kvant {:>9.3} ms   {against} {:>9.3} ms   x{:.1}", kvant * 1e3, r * 1e3, r / kvant),
        None => println!("{what:<44} kvant {:>9.3} ms", kvant * 1e3),
    }
}

fn main() {
    let w = weights(N * N, 0.02);
    let w_bf16: Vec<u8> = w.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
    let src = Floats::new(DType::BF16, &w_bf16).unwrap();
    let x = weights(N, 1.0);

    println!("kvant-bnb bench, {N}x{N}, {} threads", rayon::current_num_threads());
    let bnb = bitsandbytes_figures();
    match &bnb {
        Some(v) => println!("bitsandbytes {} (torch {}, {} threads), same run", v["bitsandbytes"], v["torch"], v["threads"]),
        None => println!("bitsandbytes: not available (set KVANT_BNB_PYTHON)"),
    }
    let reference = |k: &str| bnb.as_ref().and_then(|v| v[k].as_f64());

    let quantize = median_secs(7, || {
        let q = four_bit::quantize(src, 64, QuantType::Nf4).unwrap();
        std::hint::black_box(double_quant::compress(&q.absmax));
    });
    row("NF4 quantize BF16, blocksize 64, double quant", quantize, reference("nf4_quantize_s"), "bitsandbytes");

    let q = four_bit::quantize(src, 64, QuantType::Nf4).unwrap();
    let pack = median_secs(7, || {
        std::hint::black_box(four_bit::quantize(src, 64, QuantType::Nf4).unwrap());
    });
    let nested = median_secs(7, || {
        std::hint::black_box(double_quant::compress(&q.absmax));
    });
    println!("  of which 4-bit codes {:.3} ms, absmax double quant {:.3} ms", pack * 1e3, nested * 1e3);
    let absmax = double_quant::decompress(&double_quant::compress(&q.absmax));
    let wt = Weight4 {
        packed: &q.packed,
        absmax: &absmax,
        rows: N,
        cols: N,
        blocksize: 64,
        quant_type: QuantType::Nf4,
        dtype: DType::BF16,
    };
    let nf4_fwd = median_secs(50, || {
        std::hint::black_box(forward::forward(&wt, &x, 1, None).unwrap());
    });
    let dense_fwd = median_secs(50, || {
        std::hint::black_box(linear_forward(&x, 1, &w, (N, N), None));
    });
    row("forward batch 1: NF4 packed vs kvant dense F32", nf4_fwd, Some(dense_fwd), "dense F32   ");
    row("forward batch 1: NF4 packed vs bitsandbytes", nf4_fwd, reference("nf4_forward_bf16_s"), "bitsandbytes");
    row("forward batch 1: kvant dense F32 vs torch F32", dense_fwd, reference("dense_f32_forward_s"), "torch       ");

    let int8_q = median_secs(7, || {
        std::hint::black_box(int8::quantize(src, N, N).unwrap());
    });
    row("int8 quantize BF16 (LLM.int8 row-wise)", int8_q, reference("int8_quantize_s"), "bitsandbytes");
    let w8 = int8::quantize(src, N, N).unwrap();
    let mut x_outlier = x.clone();
    x_outlier[17] = 20.0; // one column through the dense path
    let int8_fwd = median_secs(50, || {
        std::hint::black_box(int8::forward(&w8, &x_outlier, 1, 6.0, None).unwrap());
    });
    row("int8 forward batch 1, threshold 6, 1 outlier", int8_fwd, reference("int8_forward_s"), "bitsandbytes");
}
