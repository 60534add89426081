//! Double quantization ("compress_statistics"): the 4-bit absmax values, less their mean, quantized
//! again in blocks of 256 with bitsandbytes' signed 8-bit dynamic map.
//!
//! bitsandbytes 0.50's CPU kernel for that 8-bit step does not search the map directly: it scales each
//! value to [-1, 1], turns it into one of 65536 evenly spaced slots and reads the code from a table
//! built once per map (nearest code to each slot's centre). Values closer together than a slot can
//! therefore get a code that is not the nearest one (0.0 gets code 131, not 127); this module builds
//! the same table the same way, so its codes are the ones bitsandbytes writes.

use std::sync::OnceLock;

use rayon::prelude::*;

/// Blocksize of the nested quantization, fixed by bitsandbytes.
pub const NESTED_BLOCKSIZE: usize = 256;

const LUT_SIZE: usize = 65536;

/// The signed dynamic 8-bit map of `create_dynamic_map()` (7 exponent bits), sorted, 256 values.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(build_dynamic_map)
}

fn build_dynamic_map() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    // Decades 1e-6 .. 1e0; decade i holds 2^i values, evenly spaced midpoints of a linspace(0.1, 1).
    let decades = [1e-6f64, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    for (i, &decade) in decades.iter().enumerate() {
        let bounds = linspace(0.1, 1.0, (1 << i) + 1);
        let scale = decade as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data.try_into().expect("the dynamic map has 256 entries")
}

/// `torch.linspace(start, end, steps)` in F32 as torch's CPU kernel computes it: the first half counts
/// up from `start`, the second half down from `end`, each value one fused multiply-add.
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - i - 1) as f32, end) })
        .collect()
}

/// The slot -> code table bitsandbytes builds for a 256-entry map.
fn build_lut(code: &[f32; 256]) -> Vec<u8> {
    let mids: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
    let mut lut = vec![0u8; LUT_SIZE];
    let mut c = 0usize;
    for (i, slot) in lut.iter_mut().enumerate() {
        let centre = (i as f32 + i as f32) / 65535.0 - 1.0;
        while c < 255 && centre > mids[c] {
            c += 1;
        }
        *slot = c as u8;
    }
    lut
}

fn dynamic_lut() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| build_lut(dynamic_map()))
}

/// The slot of a value already divided by its block's absmax. The fused multiply-add is what the
/// compiled kernel does; rounding it separately would move some values to the neighbouring slot.
#[inline]
fn slot(v: f32) -> usize {
    let c = v.clamp(-1.0, 1.0);
    // Truncation to a signed integer, then to 16 bits (NaN lands on slot 0, as in the kernel).
    (((c + 1.0) * 0.5).mul_add(65535.0, 0.5) as i32 as u16) as usize
}

/// bitsandbytes' CPU `quantize_blockwise` with the dynamic map: codes and per-block absmax.
pub fn quantize_blockwise(x: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    assert!(blocksize > 0, "blocksize must be positive");
    let lut = dynamic_lut();
    let mut q = vec![0u8; x.len()];
    let mut absmax = vec![0f32; x.len().div_ceil(blocksize)];
    q.par_chunks_mut(blocksize).zip(x.par_chunks(blocksize)).zip(absmax.par_iter_mut()).for_each(|((q, x), am)| {
        let m = x.iter().fold(0f32, |m, v| if m < v.abs() { v.abs() } else { m });
        *am = m;
        if m == 0.0 {
            q.fill(0);
            return;
        }
        let inv = 1.0 / m;
        for (q, &v) in q.iter_mut().zip(x) {
            *q = lut[slot(v * inv)];
        }
    });
    (q, absmax)
}

/// `code[q] * absmax[block]` with the dynamic map.
pub fn dequantize_blockwise(q: &[u8], absmax: &[f32], blocksize: usize) -> Vec<f32> {
    let code = dynamic_map();
    q.iter().enumerate().map(|(i, &c)| code[c as usize] * absmax[i / blocksize]).collect()
}

/// Double-quantized absmax: what `quant_state` keeps in place of the F32 absmax.
#[derive(Clone, Debug, PartialEq)]
pub struct NestedAbsmax {
    /// One code per 4-bit block (`weight.absmax`, uint8).
    pub codes: Vec<u8>,
    /// One F32 per 256 codes (`weight.nested_absmax`).
    pub nested_absmax: Vec<f32>,
    /// The mean that was subtracted first (`nested_offset`).
    pub offset: f32,
}

/// `absmax.mean()` as torch computes it on the CPU: `torch_sum(absmax) / n` in F32.
pub fn mean(absmax: &[f32]) -> f32 {
    torch_sum(absmax) / absmax.len() as f32
}

/// Elements torch sums on one thread before splitting a sum across threads (`at::internal::GRAIN_SIZE`).
const TORCH_GRAIN: usize = 32768;

/// torch's CPU sum of F32 values, in torch's order, so that the rounding is the same.
///
/// Up to 32768 values this is exact on any machine. Longer sums are split into one slice per
/// thread and the partial sums added; this assumes torch runs as many threads as this machine has
/// cores (its default), so on another thread count the offset can differ in the last bit.
pub fn torch_sum(x: &[f32]) -> f32 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if x.len() < TORCH_GRAIN || threads == 1 {
        return cascade_sum(x);
    }
    let used = threads.min(x.len().div_ceil(TORCH_GRAIN));
    let chunk = x.len().div_ceil(used);
    // one partial per thread torch could run, zero for the unused ones, summed the same way
    let partials: Vec<f32> =
        (0..threads).map(|t| x.get(t * chunk..((t + 1) * chunk).min(x.len())).map_or(0.0, cascade_sum)).collect();
    cascade_sum(&partials)
}

/// Lanes of torch's vectorized F32 sum: it runs its AVX2 kernel (8 lanes), even on AVX-512 machines.
const LANES: usize = 8;

trait Acc: Copy {
    fn zero() -> Self;
    fn add(self, other: Self) -> Self;
}

impl Acc for f32 {
    fn zero() -> Self {
        0.0
    }
    fn add(self, other: Self) -> Self {
        self + other
    }
}

impl Acc for [f32; LANES] {
    fn zero() -> Self {
        [0.0; LANES]
    }
    fn add(self, other: Self) -> Self {
        std::array::from_fn(|i| self[i] + other[i])
    }
}

/// One thread's share of torch's sum: whole 8-lane vectors through the cascade, the leftover elements
/// added one by one, then the lanes added to them in order. Fewer than 8 values take the scalar cascade.
fn cascade_sum(x: &[f32]) -> f32 {
    if x.len() < LANES {
        return row_sum(|i| x[i], x.len());
    }
    let vectors = x.len() / LANES;
    let v = row_sum(|i| -> [f32; LANES] { x[i * LANES..(i + 1) * LANES].try_into().unwrap() }, vectors);
    let tail = x[vectors * LANES..].iter().fold(0f32, |s, &e| s + e);
    v.iter().fold(tail, |s, &l| s + l)
}

/// Four interleaved partial sums (instruction-level parallelism in torch), each a cascade.
fn row_sum<A: Acc>(load: impl Fn(usize) -> A, size: usize) -> A {
    const ILP: usize = 4;
    let rows = size / ILP;
    let mut partial = multi_row_sum::<A, ILP>(|i, k| load(i * ILP + k), rows);
    for i in rows * ILP..size {
        partial[0] = partial[0].add(load(i));
    }
    (1..ILP).fold(partial[0], |s, k| s.add(partial[k]))
}

/// torch's cascade: sums of runs of `2^level_power` values are carried into up to four levels, so
/// only sums of similar size meet.
fn multi_row_sum<A: Acc, const R: usize>(load: impl Fn(usize, usize) -> A, size: usize) -> [A; R] {
    const LEVELS: usize = 4;
    let ceil_log2 = if size <= 2 { 1 } else { usize::BITS - (size - 1).leading_zeros() } as usize;
    let level_power = (ceil_log2 / LEVELS).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[A::zero(); R]; LEVELS];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                *a = a.add(load(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (hi, lo) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                *hi = hi.add(*lo);
                *lo = A::zero();
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    for i in i..size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            *a = a.add(load(i, k));
        }
    }
    let (first, rest) = acc.split_at_mut(1);
    for level in rest.iter() {
        for (a, b) in first[0].iter_mut().zip(level) {
            *a = a.add(*b);
        }
    }
    first[0]
}

/// Double-quantizes `absmax` with `offset = mean(absmax)`.
pub fn compress(absmax: &[f32]) -> NestedAbsmax {
    compress_with_offset(absmax, mean(absmax))
}

/// Double-quantizes `absmax` around a given offset.
pub fn compress_with_offset(absmax: &[f32], offset: f32) -> NestedAbsmax {
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (codes, nested_absmax) = quantize_blockwise(&centred, NESTED_BLOCKSIZE);
    NestedAbsmax { codes, nested_absmax, offset }
}

/// The F32 absmax a double-quantized state stands for: `map[code] * nested_absmax + offset`.
pub fn decompress(nested: &NestedAbsmax) -> Vec<f32> {
    let mut a = dequantize_blockwise(&nested.codes, &nested.nested_absmax, NESTED_BLOCKSIZE);
    a.iter_mut().for_each(|v| *v += nested.offset);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_map_shape() {
        let m = dynamic_map();
        assert_eq!(m[127], 0.0);
        assert_eq!(m[255], 1.0);
        assert!(m.windows(2).all(|w| w[0] < w[1]));
        assert!((m[0] + 0.992_968_75).abs() < 1e-7);
    }

    #[test]
    fn slots_are_coarser_than_the_smallest_codes() {
        let (q, absmax) = quantize_blockwise(&[1.0, 0.0, -1.0, 0.5], 4);
        assert_eq!(absmax, [1.0]);
        assert_eq!(q, [255, 131, 0, 219]);
        // an all-zero block is all code 0
        assert_eq!(quantize_blockwise(&[0.0; 3], 256).0, [0, 0, 0]);
    }

    #[test]
    fn compress_round_trip_is_close() {
        let absmax: Vec<f32> = (0..600).map(|i| 0.01 + (i % 17) as f32 * 0.003).collect();
        let n = compress(&absmax);
        assert_eq!(n.nested_absmax.len(), 3);
        let back = decompress(&n);
        for (a, b) in absmax.iter().zip(&back) {
            assert!((a - b).abs() < 2e-3, "{a} vs {b}");
        }
    }
}
