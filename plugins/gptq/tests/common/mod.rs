//! Synthetic weights and activations shared by the integration tests.

/// Deterministic, roughly standard normal values.
pub fn normal(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            let mut acc = 0.0;
            for _ in 0..12 {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                acc += (s >> 40) as f32 / (1u64 << 24) as f32;
            }
            acc - 6.0
        })
        .collect()
}

/// Correlated activations with uneven channel scales, like a transformer's: `rows x inp`.
pub fn activations(rows: usize, inp: usize, seed: u64) -> Vec<f32> {
    let k = inp / 4;
    let z = normal(rows * k, seed);
    let mix = normal(k * inp, seed + 1);
    let scale: Vec<f32> = (0..inp).map(|i| 0.3 + ((i * 37) % 11) as f32 / 4.0).collect();
    let mut x = vec![0f32; rows * inp];
    for r in 0..rows {
        for i in 0..inp {
            let dot: f32 = (0..k).map(|j| z[r * k + j] * mix[j * inp + i]).sum();
            x[r * inp + i] = scale[i] * (dot / (k as f32).sqrt() + 0.3 * z[r * k + i % k]);
        }
    }
    x
}
