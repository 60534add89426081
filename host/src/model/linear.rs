//! Linear layers behind one trait, so a model can mix dense and quantized (plugin) layers.

use std::sync::{Arc, OnceLock};

use anyhow::{bail, ensure, Context, Result};

use super::TensorSource;
use crate::checkpoint::Checkpoint;

/// A linear layer `y = x W^T + b`.
///
/// `x` is row-major `[rows, in_features]`; the result is row-major `[rows, out_features]`.
/// Every Linear of a [`crate::model::LlamaModel`] is one of these, so a quantization plugin's
/// packed `forward` can stand in for any dense layer.
pub trait LinearOp: Send + Sync {
    /// Applies the layer to `rows` input rows.
    fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>>;
    /// Width of one input row.
    fn in_features(&self) -> usize;
    /// Width of one output row.
    fn out_features(&self) -> usize;
}

/// A dense F32 linear layer.
///
/// The weight is shared (`Arc`) so that a tied LM head and the token embedding use one copy.
pub struct DenseLinear {
    weight: Arc<[f32]>,
    bias: Option<Vec<f32>>,
    out_features: usize,
    in_features: usize,
}

impl DenseLinear {
    /// A layer from its row-major `[out_features, in_features]` weight and optional bias.
    pub fn new(
        weight: Arc<[f32]>,
        bias: Option<Vec<f32>>,
        out_features: usize,
        in_features: usize,
    ) -> Result<DenseLinear> {
        ensure!(
            weight.len() == out_features * in_features,
            "weight has {} values, expected {out_features} x {in_features}",
            weight.len()
        );
        if let Some(b) = &bias {
            ensure!(
                b.len() == out_features,
                "bias has {} values, expected {out_features}",
                b.len()
            );
        }
        Ok(DenseLinear { weight, bias, out_features, in_features })
    }
}

impl LinearOp for DenseLinear {
    fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        ensure!(
            x.len() == rows * self.in_features,
            "linear input has {} values, expected {rows} rows x {}",
            x.len(),
            self.in_features
        );
        let mut y = vec![0f32; rows * self.out_features];
        matmul_transb(x, &self.weight, &mut y, rows, self.in_features, self.out_features, true);
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.out_features) {
                for (v, b) in row.iter_mut().zip(b) {
                    *v += b;
                }
            }
        }
        Ok(y)
    }

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }
}

/// A dense Linear whose weights are read from a checkpoint only when it first runs.
///
/// Calibration builds its model from these: each planned Linear is swapped for its quantized
/// version before it ever runs, so its F32 weights are never held; the ones that do run (full
/// precision passes, modules kept dense) hold theirs until swapped out, about one block at a
/// time.
pub struct DeferredLinear {
    source: Arc<Checkpoint>,
    name: String,
    out_features: usize,
    in_features: usize,
    dense: OnceLock<DenseLinear>,
}

impl DeferredLinear {
    /// The Linear `name` (`{name}.weight`, optional `{name}.bias`) of `source`.
    pub fn new(source: Arc<Checkpoint>, name: &str) -> Result<DeferredLinear> {
        let weight = format!("{name}.weight");
        let shape = source.shape(&weight).with_context(|| format!("missing tensor `{weight}`"))?;
        let [out_features, in_features] = shape[..] else { bail!("tensor `{weight}` has shape {shape:?}, not a matrix") };
        Ok(DeferredLinear { source, name: name.to_string(), out_features, in_features, dense: OnceLock::new() })
    }

    fn dense(&self) -> Result<&DenseLinear> {
        if let Some(d) = self.dense.get() {
            return Ok(d);
        }
        let weight = self.source.tensor_f32(&format!("{}.weight", self.name))?;
        let bias_name = format!("{}.bias", self.name);
        let bias = self.source.shape(&bias_name).map(|_| self.source.tensor_f32(&bias_name)).transpose()?;
        let d = DenseLinear::new(weight.into(), bias, self.out_features, self.in_features)?;
        Ok(self.dense.get_or_init(|| d))
    }
}

impl LinearOp for DeferredLinear {
    fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.dense()?.forward(x, rows)
    }

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }
}

/// `y = a b^T` with `a` `[m, k]`, `b` `[n, k]` and `y` `[m, n]`, all row-major and contiguous.
///
/// Uses the `gemm` crate, which picks AVX-512/AVX2/FMA kernels at run time; `parallel` lets it
/// spread the work over the rayon pool (turn it off when already inside a rayon task).
pub fn matmul_transb(a: &[f32], b: &[f32], y: &mut [f32], m: usize, k: usize, n: usize, parallel: bool) {
    matmul_strided(
        MatRef { data: a, rows: m, cols: k, row_stride: k, col_stride: 1 },
        MatRef { data: b, rows: n, cols: k, row_stride: k, col_stride: 1 },
        y,
        n,
        parallel,
    );
}

/// A read-only strided matrix view: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
/// It addresses a column block of a wider matrix (one attention head inside the
/// `[tokens, heads * head_dim]` projection) or a transposed one without copying.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl MatRef<'_> {
    /// Panics unless every addressed element lies inside `data`.
    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "strided view reaches past its data");
        }
    }
}

/// `y = a b^T` for strided views `a` `[m, k]` and `b` `[n, k]`; `y` is `[m, n]` with rows
/// `y_stride` apart. Bounds are checked here so the unsafe call below only sees valid spans.
pub(crate) fn matmul_strided(a: MatRef, b: MatRef, y: &mut [f32], y_stride: usize, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.rows);
    assert_eq!(b.cols, k, "inner dimensions differ");
    a.check();
    b.check();
    assert!(n <= y_stride || m <= 1);
    assert!(m == 0 || (m - 1) * y_stride + n <= y.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for row in y.chunks_mut(y_stride).take(m) {
            row[..n].fill(0.0);
        }
        return;
    }
    let par = if parallel {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every element the strides address inside its slice, and
    // `y` is borrowed mutably, so it does not alias `a` or `b`. `read_dst = false` means the
    // previous contents of `y` are ignored (alpha unused, beta = 1).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            y_stride as isize,
            false,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            // The right operand is b^T: its column j is b's row j.
            b.data.as_ptr(),
            b.row_stride as isize,
            b.col_stride as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    s += a[i * k + p] as f64 * b[j * k + p] as f64;
                }
                y[i * n + j] = s as f32;
            }
        }
        y
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn matmul_matches_naive_loops() {
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 7), (17, 33, 9), (64, 40, 130)] {
            let a = values(m * k, 1);
            let b = values(n * k, 2);
            let want = naive(&a, &b, m, k, n);
            for parallel in [false, true] {
                let mut y = vec![f32::NAN; m * n];
                matmul_transb(&a, &b, &mut y, m, k, n, parallel);
                for (x, w) in y.iter().zip(&want) {
                    assert!((x - w).abs() < 1e-5, "{m}x{k}x{n}: {x} vs {w}");
                }
            }
        }
    }

    #[test]
    fn strided_views_address_column_blocks() {
        // a is the middle 3 columns of a 4x7 matrix, y the first 2 columns of a 4x5 buffer.
        let wide = values(4 * 7, 3);
        let b = values(2 * 3, 4);
        let mut y = vec![9f32; 4 * 5];
        matmul_strided(
            MatRef { data: &wide[2..], rows: 4, cols: 3, row_stride: 7, col_stride: 1 },
            MatRef { data: &b, rows: 2, cols: 3, row_stride: 3, col_stride: 1 },
            &mut y,
            5,
            false,
        );
        for i in 0..4 {
            for j in 0..2 {
                let want: f32 = (0..3).map(|p| wide[i * 7 + 2 + p] * b[j * 3 + p]).sum();
                assert!((y[i * 5 + j] - want).abs() < 1e-6);
            }
            assert_eq!(&y[i * 5 + 2..i * 5 + 5], &[9.0; 3], "untouched columns");
        }
    }

    #[test]
    fn dense_linear_adds_bias_and_checks_shapes() {
        let lin = DenseLinear::new(vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0].into(), Some(vec![0.0, 1.0, 2.0]), 3, 2).unwrap();
        assert_eq!(lin.forward(&[1.0, 2.0], 1).unwrap(), [1.0, 3.0, 5.0]);
        assert!(lin.forward(&[1.0, 2.0, 3.0], 1).is_err());
        assert!(DenseLinear::new(vec![0.0; 5].into(), None, 3, 2).is_err());
    }
}
