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

/// A zero-filled vector of `len` values for a large result, such as a dequantized weight.
///
/// On Linux, its memory is marked for transparent huge pages before anything touches it: the
/// first write to fresh memory then faults once per 2 MiB instead of once per 4 KiB, and for a
/// 100 MB weight those faults (and freeing the pages again) cost more than decoding it. Where
/// the system keeps huge pages off, or elsewhere, it is a plain `vec![0.0; len]`.
pub fn zeroed(len: usize) -> Vec<f32> {
    let v = vec![0f32; len];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (v.as_ptr() as usize).next_multiple_of(HUGE);
        let end = (v.as_ptr() as usize + len * 4) & !(HUGE - 1);
        if end > start {
            // SAFETY: [start, end) lies inside the vector's own allocation; MADV_HUGEPAGE only
            // advises how to back it and changes no contents. Failure is harmless.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    v
}

/// Relative Frobenius error `||a - b|| / ||b||` (`||a||` when `b` is zero).
///
/// On the calling thread, with AVX2 where the CPU has it: one core streams both vectors about as
/// fast as memory delivers them, and no thread pool has to wake up. (A plugin's hooks run in its
/// own pool; handing the host's pool the comparison right after cost the host more than it saved.)
pub fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "relative_error of vectors of different lengths");
    let (num, den) = squared_sums(a, b);
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// `(sum (a-b)^2, sum b^2)`.
fn squared_sums(a: &[f32], b: &[f32]) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { squared_sums_avx2(a, b) };
    }
    squared_sums_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn squared_sums_avx2(a: &[f32], b: &[f32]) -> (f64, f64) {
    squared_sums_lanes(a, b)
}

/// Sums in F32 lanes within blocks of [`BLOCK`] values, each block's sums added in F64: a lane
/// adds only `BLOCK / LANES` squares, so F32 loses nothing that matters to an error ratio, and
/// the lanes vectorise (F64 lanes would halve the width).
#[inline(always)]
fn squared_sums_lanes(a: &[f32], b: &[f32]) -> (f64, f64) {
    const LANES: usize = 16;
    const BLOCK: usize = 1024;
    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        let (mut n, mut d) = ([0f32; LANES], [0f32; LANES]);
        let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let tail = ca.remainder().iter().zip(cb.remainder());
        for (x, y) in ca.zip(cb) {
            for k in 0..LANES {
                let e = x[k] - y[k];
                n[k] += e * e;
                d[k] += y[k] * y[k];
            }
        }
        for (&x, &y) in tail {
            n[0] += (x - y) * (x - y);
            d[0] += y * y;
        }
        num += n.iter().map(|&v| v as f64).sum::<f64>();
        den += d.iter().map(|&v| v as f64).sum::<f64>();
    }
    (num, den)
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
    fn zeroed_is_zeros_of_the_length_asked() {
        for len in [0, 1, 1000, (3 << 20) + 5] {
            let v = zeroed(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn relative_error_is_scale_free() {
        assert_eq!(relative_error(&[1.0, 1.0], &[1.0, 1.0]), 0.0);
        let e = relative_error(&[3.0, 0.0], &[4.0, 0.0]);
        assert!((e - 0.25).abs() < 1e-12);
    }

    #[test]
    fn relative_error_matches_f64_sums_over_many_blocks() {
        // 100,003 values: 97 full blocks, a short one, and a tail shorter than the lanes.
        let n = 100_003;
        let b: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0).collect();
        let a: Vec<f32> = b.iter().enumerate().map(|(i, v)| v + ((i % 13) as f32 - 6.0) * 1e-3).collect();
        let (num, den) = a.iter().zip(&b).fold((0f64, 0f64), |(n, d), (&x, &y)| {
            (n + (x as f64 - y as f64).powi(2), d + (y as f64).powi(2))
        });
        let want = (num / den).sqrt();
        let got = relative_error(&a, &b);
        assert!((got - want).abs() < 1e-6 * want, "{got} vs {want}");
        assert_eq!(squared_sums(&a, &b), squared_sums_lanes(&a, &b), "the AVX2 path computes the same sums");
        // Against zeros: the norm of the other.
        let norm = relative_error(&b, &vec![0.0; n]);
        assert!((norm - den.sqrt()).abs() < 1e-6 * den.sqrt(), "{norm} vs {}", den.sqrt());
    }
}
