//! Dense kernels GPTQ needs: a strided matrix product, a blocked Cholesky factorization and
//! the upper Cholesky factor of an inverse, all on row-major square matrices.

use rayon::prelude::*;

/// A read-only strided matrix operand: element `(r, c)` is `data[offset + r*rs + c*cs]`.
#[derive(Clone, Copy)]
pub struct Operand<'a, T> {
    /// The backing storage.
    pub data: &'a [T],
    /// Index of element `(0, 0)`.
    pub offset: usize,
    /// Distance between rows.
    pub rs: usize,
    /// Distance between columns.
    pub cs: usize,
}

impl<'a, T> Operand<'a, T> {
    /// A row-major view with row length `rs`, starting at `offset`.
    pub fn rows(data: &'a [T], offset: usize, rs: usize) -> Self {
        Operand { data, offset, rs, cs: 1 }
    }

    /// The transpose of a row-major view: element `(r, c)` is `data[offset + c*ld + r]`.
    pub fn transposed(data: &'a [T], offset: usize, ld: usize) -> Self {
        Operand { data, offset, rs: 1, cs: ld }
    }

    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            let last = self.offset + (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.data.len(), "matrix operand out of bounds");
        }
    }
}

/// `dst[m x n] (row-major, row length ld, from offset) = keep*dst + scale * lhs[m x k] * rhs[k x n]`;
/// `keep` 0 ignores what `dst` held. Runs on `gemm`'s kernels, on the rayon pool when `parallel`.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Copy + 'static>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    (offset, ld): (usize, usize),
    lhs: Operand<'_, T>,
    rhs: Operand<'_, T>,
    (keep, scale): (T, T),
    read_dst: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(offset + (m - 1) * ld + n <= dst.len(), "matmul destination out of bounds");
    lhs.check(m, k);
    rhs.check(k, n);
    let parallelism = if parallel { gemm::Parallelism::Rayon(rayon::current_num_threads()) } else { gemm::Parallelism::None };
    // SAFETY: every index the product touches was bounds-checked above; dst does not alias the
    // operands (it is a distinct &mut borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(offset),
            1,
            ld as isize,
            read_dst,
            lhs.data.as_ptr().add(lhs.offset),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr().add(rhs.offset),
            rhs.cs as isize,
            rhs.rs as isize,
            keep,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Block width of the factorizations: small enough that the plain-loop parts stay cheap,
/// large enough that the matrix products dominate.
const NB: usize = 64;

/// Rows per trailing-update product in the Cholesky factorization.
const BAND: usize = 256;

/// Factors the symmetric positive definite `a` (row-major `n x n`, lower triangle read) in
/// place into its lower Cholesky factor `L` (`a = L L^T`); the strict upper triangle is zeroed.
/// Fails with the first column whose pivot is not positive (or not finite).
pub fn cholesky_lower(a: &mut [f64], n: usize) -> Result<(), usize> {
    assert_eq!(a.len(), n * n);
    for k0 in (0..n).step_by(NB) {
        let k1 = (k0 + NB).min(n);
        let nb = k1 - k0;
        // The diagonal block, unblocked.
        for j in k0..k1 {
            let mut d = a[j * n + j];
            for p in k0..j {
                d -= a[j * n + p] * a[j * n + p];
            }
            if !(d > 0.0 && d.is_finite()) {
                return Err(j);
            }
            let d = d.sqrt();
            a[j * n + j] = d;
            for i in j + 1..k1 {
                let mut s = a[i * n + j];
                for p in k0..j {
                    s -= a[i * n + p] * a[j * n + p];
                }
                a[i * n + j] = s / d;
            }
        }
        // Rows below the block: solve X L_kk^T = B, row by row (independent rows).
        let (head, tail) = a.split_at_mut(k1 * n);
        let diag = &head[k0 * n..];
        tail.par_chunks_mut(n).for_each(|row| {
            for j in 0..nb {
                let mut s = row[k0 + j];
                for p in 0..j {
                    s -= row[k0 + p] * diag[j * n + k0 + p];
                }
                row[k0 + j] = s / diag[j * n + k0 + j];
            }
        });
        // Right-looking update of the trailing lower triangle, A[k1.., k1..] -= P P^T with P the
        // panel just solved, one row band at a time so only the lower part is computed.
        let panel: Vec<f64> = (k1..n).flat_map(|r| a[r * n + k0..r * n + k1].to_vec()).collect();
        for r0 in (k1..n).step_by(BAND) {
            let r1 = (r0 + BAND).min(n);
            let lhs = Operand::rows(&panel, (r0 - k1) * nb, nb);
            let rhs = Operand::transposed(&panel, 0, nb);
            matmul((r1 - r0, r1 - k1, nb), a, (r0 * n + k1, n), lhs, rhs, (1.0, -1.0), true, true);
        }
    }
    for i in 0..n {
        a[i * n + i + 1..(i + 1) * n].fill(0.0);
    }
    Ok(())
}

/// Inverts a lower-triangular `l` (row-major `n x n`): the result is lower triangular.
pub fn invert_lower(l: &[f64], n: usize) -> Vec<f64> {
    assert_eq!(l.len(), n * n);
    let mut x = vec![0f64; n * n];
    // Blocked forward substitution on L X = I, one block row at a time:
    // X[i-block, :] = L_ii^{-1} (I - L[i-block, ..i0] X[..i0, :]); only columns < i1 are non-zero.
    for i0 in (0..n).step_by(NB) {
        let i1 = (i0 + NB).min(n);
        let nb = i1 - i0;
        let (done, rest) = x.split_at_mut(i0 * n);
        let block = &mut rest[..nb * n];
        for r in 0..nb {
            block[r * n + i0 + r] = 1.0;
        }
        if i0 > 0 {
            let lhs = Operand::rows(l, i0 * n, n);
            let rhs = Operand::rows(done, 0, n);
            matmul((nb, i0, i0), block, (0, n), lhs, rhs, (1.0, -1.0), true, true);
        }
        // Now solve L_ii Y = block (columns 0..i1), row by row in order.
        for r in 0..nb {
            let (prev, cur) = block.split_at_mut(r * n);
            let cur = &mut cur[..n];
            for p in 0..r {
                let f = l[(i0 + r) * n + i0 + p];
                if f != 0.0 {
                    let src = &prev[p * n..p * n + i1];
                    cur[..i1].iter_mut().zip(src).for_each(|(c, s)| *c -= f * s);
                }
            }
            let d = l[(i0 + r) * n + i0 + r];
            cur[..i1].iter_mut().for_each(|c| *c /= d);
        }
    }
    x
}

/// The upper Cholesky factor `U` of `(h + damp I)^{-1}` (`= U^T U`), which GPTQ's column
/// updates read, computed without forming the inverse: with `J` the reversal permutation and
/// `J (h + damp I) J = M M^T`, `U = J M^{-1} J`. Reversing both rows and columns of a
/// row-major square matrix is reversing its storage. Fails with the failing column of `h`
/// when `h + damp I` is not positive definite.
pub fn inverse_cholesky_upper(h: &[f64], n: usize, damp: f64) -> Result<Vec<f64>, usize> {
    let mut rev: Vec<f64> = h.iter().rev().copied().collect();
    for i in 0..n {
        rev[i * n + i] += damp;
    }
    cholesky_lower(&mut rev, n).map_err(|j| n - 1 - j)?;
    let mut u = invert_lower(&rev, n);
    u.reverse();
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spd(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        let b: Vec<f64> = (0..n * n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            })
            .collect();
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|k| b[i * n + k] * b[j * n + k]).sum::<f64>() + if i == j { 0.1 } else { 0.0 };
            }
        }
        a
    }

    #[test]
    fn cholesky_reconstructs_across_blocks() {
        let n = 150;
        let a = spd(n, 3);
        let mut l = a.clone();
        cholesky_lower(&mut l, n).unwrap();
        for i in 0..n {
            for j in 0..n {
                let v: f64 = (0..n).map(|k| l[i * n + k] * l[j * n + k]).sum();
                assert!((v - a[i * n + j]).abs() < 1e-9 * (1.0 + a[i * n + j].abs()), "{i},{j}");
            }
        }
    }

    #[test]
    fn inverse_cholesky_upper_is_upper_and_inverts() {
        let n = 140;
        let a = spd(n, 5);
        let u = inverse_cholesky_upper(&a, n, 0.0).unwrap();
        for i in 0..n {
            assert!(u[i * n + i] > 0.0);
            for j in 0..i {
                assert_eq!(u[i * n + j], 0.0);
            }
        }
        // (U^T U) a = I.
        let inv: Vec<f64> = (0..n * n).map(|idx| (0..n).map(|k| u[k * n + idx / n] * u[k * n + idx % n]).sum()).collect();
        for i in 0..n {
            for j in 0..n {
                let v: f64 = (0..n).map(|k| inv[i * n + k] * a[k * n + j]).sum();
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-8, "{i},{j}: {v}");
            }
        }
    }

    #[test]
    fn indefinite_matrix_reports_a_column() {
        let mut a = vec![1.0, 2.0, 2.0, 1.0];
        assert_eq!(cholesky_lower(&mut a, 2), Err(1));
    }
}
