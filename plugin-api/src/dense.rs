//! Plain dense arithmetic shared by plugins and the conformance checks.

use rayon::prelude::*;

/// `y = x W^T + b`: `x` is `[rows, in]`, `w` is `[out, in]`, both row-major; `y` is `[rows, out]`.
///
/// Runs on the `gemm` crate's kernels (AVX-512/AVX2/FMA picked at run time, a portable path
/// elsewhere), spread over the current rayon pool: the default `forward` of every method
/// and the conformance checks' reference share it.
pub fn linear_forward(x: &[f32], rows: usize, w: &[f32], (out, inp): (usize, usize), bias: Option<&[f32]>) -> Vec<f32> {
    assert_eq!(x.len(), rows * inp, "x is not [rows, in_features]");
    assert_eq!(w.len(), out * inp, "w is not [out_features, in_features]");
    if let Some(b) = bias {
        assert_eq!(b.len(), out, "bias is not [out_features]");
    }
    let mut y = vec![0f32; rows * out];
    if rows > 0 && out > 0 && inp > 0 {
        // SAFETY: x is [rows, inp] (row stride inp), w read as W^T [inp, out] (column stride
        // inp, row stride 1), y is [rows, out]; the asserts above bound every index.
        unsafe {
            gemm::gemm(
                rows,
                out,
                inp,
                y.as_mut_ptr(),
                1,
                out as isize,
                false,
                x.as_ptr(),
                1,
                inp as isize,
                w.as_ptr(),
                inp as isize,
                1,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
    }
    if let Some(b) = bias {
        y.par_chunks_mut(out).for_each(|row| row.iter_mut().zip(b).for_each(|(y, b)| *y += b));
    }
    y
}

/// Relative Frobenius error `||a - b|| / ||b||` (0 when both are zero).
pub fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    // Blocks in parallel; within one, independent lanes so that the sums vectorise.
    let (num, den) = a
        .par_chunks(1 << 16)
        .zip(b.par_chunks(1 << 16))
        .map(|(a, b)| squared_sums(a, b))
        .reduce(|| (0.0, 0.0), |(n1, d1), (n2, d2)| (n1 + n2, d1 + d2));
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// `(sum (a-b)^2, sum b^2)` in f64.
fn squared_sums(a: &[f32], b: &[f32]) -> (f64, f64) {
    const LANES: usize = 8;
    let (mut num, mut den) = ([0f64; LANES], [0f64; LANES]);
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = ca.remainder().iter().zip(cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..LANES {
            let (e, y) = ((x[k] - y[k]) as f64, y[k] as f64);
            num[k] += e * e;
            den[k] += y * y;
        }
    }
    let lanes = (num.iter().sum::<f64>(), den.iter().sum::<f64>());
    tail.fold(lanes, |(n, d), (&x, &y)| {
        let (e, y) = ((x - y) as f64, y as f64);
        (n + e * e, d + y * y)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_forward_matches_naive_sums() {
        let (rows, out, inp) = (5, 7, 33);
        let x: Vec<f32> = (0..rows * inp).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let w: Vec<f32> = (0..out * inp).map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0).collect();
        let b: Vec<f32> = (0..out).map(|i| i as f32 * 0.5).collect();
        let y = linear_forward(&x, rows, &w, (out, inp), Some(&b));
        for r in 0..rows {
            for o in 0..out {
                let want: f64 = (0..inp).map(|i| x[r * inp + i] as f64 * w[o * inp + i] as f64).sum::<f64>() + b[o] as f64;
                assert!((y[r * out + o] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()), "{r},{o}");
            }
        }
    }

    #[test]
    fn linear_forward_matches_hand_computation() {
        // x = [[1, 2]], W = [[1, 0], [0, 1], [1, 1]], b = [0, 1, 2]
        let y = linear_forward(&[1.0, 2.0], 1, &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], (3, 2), Some(&[0.0, 1.0, 2.0]));
        assert_eq!(y, [1.0, 3.0, 5.0]);
    }

    #[test]
    fn relative_error_is_scale_free() {
        assert_eq!(relative_error(&[1.0, 1.0], &[1.0, 1.0]), 0.0);
        let e = relative_error(&[3.0, 0.0], &[4.0, 0.0]);
        assert!((e - 0.25).abs() < 1e-12);
    }
}
