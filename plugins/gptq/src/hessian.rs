//! The calibration observer: accumulates `X^T X` of a Linear's inputs.

use kvant_plugin_api::{Error, Observer, Result};

use crate::bf16;
use crate::linalg::{matmul, Operand};

/// Rows of the lower triangle computed per matrix product: narrower bands skip more of the
/// (unneeded) upper triangle, wider ones keep the products efficient.
const BAND: usize = 128;

/// GPTQ's calibration state for one Linear: the running sum `S = sum x x^T` over every input
/// row `x` seen (lower triangle, F32) and the row count `n`; the Hessian is `H = 2 S / n`.
///
/// The state depends only on the inputs: Linears that read the same inputs (q/k/v, gate/up)
/// can share one observer.
pub struct HessianObserver {
    name: String,
    inp: usize,
    sum: Vec<f32>,
    rows: u64,
    bf16: bool,
}

impl HessianObserver {
    /// An empty observer for a Linear named `name` with `inp` input features, multiplying in F32.
    pub fn new(name: impl Into<String>, inp: usize) -> Self {
        HessianObserver { name: name.into(), inp, sum: vec![0f32; inp * inp], rows: 0, bf16: false }
    }

    /// Multiply inputs rounded to BF16 (sums stay F32) when `bf16` and the CPU has
    /// AVX512-BF16, about twice as fast; otherwise in F32.
    pub fn with_bf16(mut self, bf16: bool) -> Self {
        self.bf16 = bf16 && bf16::available();
        self
    }

    /// True when products run in BF16.
    pub fn uses_bf16(&self) -> bool {
        self.bf16
    }

    /// Input rows seen so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The full symmetric Hessian `2 X^T X / n` in F64 (zero when no row was seen).
    pub fn hessian(&self) -> Vec<f64> {
        let n = self.inp;
        let f = if self.rows == 0 { 0.0 } else { 2.0 / self.rows as f64 };
        let mut h = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..=i {
                let v = self.sum[i * n + j] as f64 * f;
                h[i * n + j] = v;
                h[j * n + i] = v;
            }
        }
        h
    }
}

impl Observer for HessianObserver {
    fn observe(&mut self, x: &[f32], rows: usize) -> Result<()> {
        let n = self.inp;
        if x.len() != rows * n {
            return Err(Error::new(format!(
                "module `{}`: calibration batch has {} values, expected {rows} rows of {n}",
                self.name,
                x.len()
            )));
        }
        // Chunks of plain folds vectorize; `any` stops early and does not.
        let non_finite = |c: &[f32]| c.iter().fold(false, |bad, v| bad | !v.is_finite());
        if x.chunks(4096).any(non_finite) {
            return Err(Error::new(format!("module `{}`: calibration inputs contain NaN or infinity", self.name)));
        }
        if self.bf16 {
            bf16::add_xtx_lower(&mut self.sum, n, x, rows);
            self.rows += rows as u64;
            return Ok(());
        }
        // S[r0..r1, 0..r1] += X[:, r0..r1]^T X[:, 0..r1]: the lower triangle, band by band.
        for r0 in (0..n).step_by(BAND) {
            let r1 = (r0 + BAND).min(n);
            let lhs = Operand::transposed(x, r0, n);
            let rhs = Operand::rows(x, 0, n);
            matmul((r1 - r0, r1, rows), &mut self.sum, (r0 * n, n), lhs, rhs, (1.0, 1.0), true, true);
        }
        self.rows += rows as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hessian_is_two_xtx_over_n_across_batches() {
        let n = 300;
        let x: Vec<f32> = (0..7 * n).map(|i| ((i * 31 % 17) as f32 - 8.0) / 4.0).collect();
        let mut obs = HessianObserver::new("m", n);
        obs.observe(&x[..3 * n], 3).unwrap();
        obs.observe(&x[3 * n..], 4).unwrap();
        assert_eq!(obs.rows(), 7);
        let h = obs.hessian();
        for i in (0..n).step_by(7) {
            for j in (0..n).step_by(5) {
                let want: f64 = (0..7).map(|r| x[r * n + i] as f64 * x[r * n + j] as f64).sum::<f64>() * 2.0 / 7.0;
                assert!((h[i * n + j] - want).abs() < 1e-4, "{i},{j}");
            }
        }
    }

    #[test]
    fn bad_batches_are_refused_with_the_module_name() {
        let mut obs = HessianObserver::new("layers.0.q", 4);
        assert!(obs.observe(&[0.0; 7], 2).unwrap_err().0.contains("layers.0.q"));
        assert!(obs.observe(&[f32::NAN, 0.0, 0.0, 0.0], 1).unwrap_err().0.contains("NaN"));
    }
}
