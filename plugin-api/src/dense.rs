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
    let (num, den) = a.iter().zip(b).fold((0f64, 0f64), |(n, d), (&x, &y)| {
        let e = (x - y) as f64;
        (n + e * e, d + (y as f64) * (y as f64))
    });
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
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
