//! Plain dense arithmetic shared by plugins and the conformance checks.

use rayon::prelude::*;

/// `y = x W^T + b`: `x` is `[rows, in]`, `w` is `[out, in]`, both row-major; `y` is `[rows, out]`.
pub fn linear_forward(x: &[f32], rows: usize, w: &[f32], (out, inp): (usize, usize), bias: Option<&[f32]>) -> Vec<f32> {
    assert_eq!(x.len(), rows * inp, "x is not [rows, in_features]");
    assert_eq!(w.len(), out * inp, "w is not [out_features, in_features]");
    let mut y = vec![0f32; rows * out];
    y.par_chunks_mut(out).zip(x.par_chunks(inp)).for_each(|(y_row, x_row)| {
        for (o, y) in y_row.iter_mut().enumerate() {
            let w_row = &w[o * inp..(o + 1) * inp];
            *y = w_row.iter().zip(x_row).map(|(a, b)| a * b).sum::<f32>() + bias.map_or(0.0, |b| b[o]);
        }
    });
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
