//! `S += X^T X` (lower triangle) with BF16 products and F32 sums, on AVX512-BF16's
//! `vdpbf16ps`, which does twice the multiply-adds of an F32 FMA per instruction.
//!
//! Rows of `X` are taken in pairs: the packed word for (row pair `rp`, column `c`) holds
//! `bf16(x[2rp][c])` low and `bf16(x[2rp+1][c])` high, so one `vdpbf16ps` lane adds
//! `x[2rp][i] x[2rp][j] + x[2rp+1][i] x[2rp+1][j]`. Packed columns are stored in panels of 16
//! (one vector) with row pairs consecutive, so the kernel streams memory in order.

use rayon::prelude::*;

/// Rows of `S` per tile (broadcast operands).
const MR: usize = 8;
/// Columns of `S` per tile: three vectors of 16.
const NR: usize = 48;
/// Input rows packed and multiplied at a time. Fewer, longer passes mean fewer waits between
/// the pool's threads; measured on 2 cores, 2048 beats 512 (the panels no longer fit L2,
/// but the kernel streams them in order) and a whole 4096-row batch at once.
const ROWS_PER_PASS: usize = 2048;

/// True when this CPU can run [`add_xtx_lower`].
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Adds the lower triangle (and some entries just above the diagonal) of `X^T X` to `s`
/// (`n x n` row-major), `x` being `rows x n` row-major. Call only when [`available`].
pub fn add_xtx_lower(s: &mut [f32], n: usize, x: &[f32], rows: usize) {
    assert!(available(), "AVX512-BF16 is not available");
    assert_eq!(s.len(), n * n);
    assert_eq!(x.len(), rows * n);
    let padded = n.div_ceil(NR) * NR;
    // One buffer for every pass: the padding columns stay zero, the rest is rewritten.
    let mut packed = vec![0u32; padded * ROWS_PER_PASS.min(rows).div_ceil(2)];
    for pass in x.chunks(ROWS_PER_PASS * n) {
        let pairs = (pass.len() / n).div_ceil(2);
        let packed = &mut packed[..padded * pairs];
        pack(pass, n, pairs, packed);
        let packed = &*packed;
        s.par_chunks_mut(MR * n).enumerate().for_each(|(t, rows_of_s)| {
            let i0 = t * MR;
            let mut tile = [[0f32; NR]; MR];
            let mut j0 = 0;
            // Tiles up to and including the one holding the diagonal entries of rows i0..i0+MR.
            while j0 < n && j0 < i0 + MR {
                // SAFETY: `available()` was checked; the panel offsets stay inside `packed`
                // (i0 < n <= padded and j0 + NR <= padded).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    tile_kernel(packed, pairs, i0, j0, &mut tile)
                };
                for (m, row) in tile.iter().enumerate().take((n - i0).min(MR)) {
                    let dst = &mut rows_of_s[m * n + j0..m * n + (j0 + NR).min(n)];
                    dst.iter_mut().zip(row).for_each(|(d, v)| *d += v);
                }
                j0 += NR;
            }
        });
    }
}

/// Packs `pairs` row pairs of `x` (`n` columns; an odd last row is paired with zeros) into
/// `out`, in panels of 16 columns: word `(c / 16) * pairs * 16 + rp * 16 + c % 16`. Words of
/// columns past `n` are left as they are (zero).
fn pack(x: &[f32], n: usize, pairs: usize, out: &mut [u32]) {
    out.par_chunks_mut(16 * pairs).enumerate().for_each(|(panel, words)| {
        if panel * 16 < n {
            // SAFETY: `pack` runs only where `available()` holds (AVX-512F).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                pack_panel_avx512(x, n, panel * 16, words)
            };
        }
    });
}

/// Packs the columns `c0..c0 + 16` (those below `n`) of every row pair of `x` into `words`
/// (`16` per pair): `bf16(x[2rp][c]) | bf16(x[2rp + 1][c]) << 16`, rounded to nearest even,
/// sixteen at a time (one scalar at a time was a third of the observer's time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_panel_avx512(x: &[f32], n: usize, c0: usize, words: &mut [u32]) {
    use std::arch::x86_64::*;
    let rows = x.len() / n;
    let width = (n - c0).min(16);
    let mask: __mmask16 = if width == 16 { 0xFFFF } else { (1u16 << width) - 1 };
    let (half, one, top) = (_mm512_set1_epi32(0x7FFF), _mm512_set1_epi32(1), _mm512_set1_epi32(0xFFFF_0000u32 as i32));
    for (rp, dst) in words.chunks_exact_mut(16).enumerate() {
        let r = 2 * rp;
        // Plain statements, no closure: intrinsics must inline into this target_feature body.
        // bits + 0x7FFF + ((bits >> 16) & 1): the top half is then the rounded BF16.
        let lo = _mm512_maskz_loadu_epi32(mask, x.as_ptr().add(r * n + c0) as *const i32);
        let lo = _mm512_add_epi32(_mm512_add_epi32(lo, half), _mm512_and_si512(_mm512_srli_epi32::<16>(lo), one));
        let hi = if r + 1 < rows {
            let hi = _mm512_maskz_loadu_epi32(mask, x.as_ptr().add((r + 1) * n + c0) as *const i32);
            _mm512_add_epi32(_mm512_add_epi32(hi, half), _mm512_and_si512(_mm512_srli_epi32::<16>(hi), one))
        } else {
            _mm512_setzero_si512()
        };
        let packed = _mm512_or_si512(_mm512_srli_epi32::<16>(lo), _mm512_and_si512(hi, top));
        _mm512_storeu_si512(dst.as_mut_ptr() as *mut __m512i, packed);
    }
}

/// `tile[m][l] = sum over row pairs of S-contributions for (i0 + m, j0 + l)`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_kernel(packed: &[u32], pairs: usize, i0: usize, j0: usize, tile: &mut [[f32; NR]; MR]) {
    use std::arch::x86_64::*;
    let stride = 16 * pairs;
    let a = packed.as_ptr().add(i0 / 16 * stride + i0 % 16);
    let b = packed.as_ptr().add(j0 / 16 * stride);
    let mut acc = [[_mm512_setzero_ps(); 3]; MR];
    for rp in 0..pairs {
        // Plain statements, no closure: intrinsics must inline into this target_feature body.
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(rp * 16) as *const __m512i));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(stride + rp * 16) as *const __m512i));
        let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(2 * stride + rp * 16) as *const __m512i));
        for (m, acc_m) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(rp * 16 + m) as i32));
            acc_m[0] = _mm512_dpbf16_ps(acc_m[0], av, b0);
            acc_m[1] = _mm512_dpbf16_ps(acc_m[1], av, b1);
            acc_m[2] = _mm512_dpbf16_ps(acc_m[2], av, b2);
        }
    }
    for (m, acc_m) in acc.iter().enumerate() {
        for v in 0..3 {
            _mm512_storeu_ps(tile[m].as_mut_ptr().add(16 * v), acc_m[v]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

/// The scalar rounding the packing does sixteen at a time.
#[inline(always)]
fn to_bf16(v: f32) -> u32 {
    let bits = v.to_bits();
    (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
}

    #[test]
    fn packing_rounds_as_the_scalar_code() {
        if !available() {
            return;
        }
        // 37 columns (a partial panel), 5 rows (an odd last row).
        let (n, rows) = (37usize, 5usize);
        let x: Vec<f32> = (0..n * rows).map(|k| f32::from_bits((k as u32).wrapping_mul(2_654_435_761) & 0xBFFF_FFFF) * 1e-3).collect();
        let (pairs, padded) = (rows.div_ceil(2), 48);
        let mut words = vec![0u32; padded * pairs];
        pack(&x, n, pairs, &mut words);
        for c in 0..padded {
            for rp in 0..pairs {
                let at = |r: usize| if c < n && r < rows { to_bf16(x[r * n + c]) } else { 0 };
                assert_eq!(words[c / 16 * pairs * 16 + rp * 16 + c % 16], at(2 * rp) | at(2 * rp + 1) << 16, "column {c}, pair {rp}");
            }
        }
    }

    #[test]
    fn bf16_rounding_matches_half() {
        for k in 0..100_000u32 {
            let v = f32::from_bits(k.wrapping_mul(2_654_435_761) & 0xBFFF_FFFF);
            if v.is_finite() {
                assert_eq!(to_bf16(v), half::bf16::from_f32(v).to_bits() as u32, "{v}");
            }
        }
    }

    #[test]
    fn matches_f64_products_of_the_bf16_rounded_inputs() {
        if !available() {
            return;
        }
        // Odd row count, widths that are not multiples of the tile, more rows than one pass.
        for (n, rows) in [(70, 1037), (8, 3), (131, 600)] {
            let x: Vec<f32> = (0..rows * n).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0).collect();
            let mut s = vec![0f32; n * n];
            add_xtx_lower(&mut s, n, &x, rows);
            let r: Vec<f64> = x.iter().map(|&v| half::bf16::from_f32(v).to_f32() as f64).collect();
            for i in 0..n {
                for j in 0..=i {
                    let want: f64 = (0..rows).map(|k| r[k * n + i] * r[k * n + j]).sum();
                    let got = s[i * n + j] as f64;
                    assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0) * (rows as f64).sqrt(), "n {n} ({i},{j}): {got} vs {want}");
                }
            }
        }
    }
}
