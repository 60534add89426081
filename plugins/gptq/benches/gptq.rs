//! Times GPTQ on SmolLM2-sized layers: Hessian accumulation from 128 x 512 calibration rows,
//! then the solve (4-bit, group 128, symmetric, damp 0.05). `cargo bench -p kvant-gptq`.

use std::time::Instant;

use kvant_gptq::{gptq, GptqParams, HessianObserver};
use kvant_plugin_api::Observer;

/// Deterministic values in [-1, 1), with a few wide input channels as real activations have.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// CPU seconds used by this process so far (user + system), from /proc: robust to other
/// processes sharing the cores.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let rows = 128 * 512;
    let batch = 512;
    let p = GptqParams {
        bits: 4,
        group_size: 128,
        sym: true,
        desc_act: false,
        static_groups: false,
        damp_percent: 0.05,
        damp_auto_increment: 0.01,
        mse: 0.0,
        zero_at_least_one: false,
        refit_scales: false,
    };
    println!("threads: {}", rayon::current_num_threads());
    for (out, inp) in [(1536usize, 576usize), (576, 1536)] {
        let x = values(batch * inp, 1);
        let w = values(out * inp, 2);
        for bf16 in [false, true] {
            let (t0, c0) = (Instant::now(), cpu_seconds());
            let mut obs = HessianObserver::new("bench", inp).with_bf16(bf16);
            for _ in 0..rows / batch {
                obs.observe(&x, batch).unwrap();
            }
            let (t_h, c_h) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
            let (t1, c1) = (Instant::now(), cpu_seconds());
            let solved = gptq("bench", &w, (out, inp), obs.hessian(), obs.rows(), &p).unwrap();
            let (t_s, c_s) = (t1.elapsed().as_secs_f64(), cpu_seconds() - c1);
            // Useful work: the lower triangle of X^T X, rows * in^2 multiply-adds.
            let flop = rows as f64 * inp as f64 * inp as f64;
            println!(
                "{out}x{inp} ({} products): hessian {t_h:.3} s wall / {c_h:.2} CPU-s ({:.0} GFLOP/s wall, {:.0} per CPU-s), \
                 solve {t_s:.3} s wall / {c_s:.2} CPU-s, total {:.3} s wall, loss {:.5}",
                if obs.uses_bf16() { "BF16" } else { "F32" },
                flop / t_h / 1e9,
                flop / c_h.max(1e-9) / 1e9,
                t_h + t_s,
                solved.loss
            );
        }
    }
    let mut p_mse = p;
    p_mse.mse = 2.4;
    let (out, inp) = (1536usize, 576usize);
    let x = values(batch * inp, 1);
    let mut obs = HessianObserver::new("bench", inp);
    obs.observe(&x, batch).unwrap();
    let w = values(out * inp, 2);
    let t = Instant::now();
    gptq("bench", &w, (out, inp), obs.hessian(), obs.rows(), &p_mse).unwrap();
    println!("{out}x{inp} solve with mse=2.4: {:.3} s", t.elapsed().as_secs_f64());
}
