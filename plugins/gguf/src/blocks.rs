//! Dequantization of ggml tensor blocks to F32.
//!
//! Layouts follow the block structs of ggml (`ggml-common.h`): every quantized type stores its
//! elements in fixed-size blocks of `block_size` values and `type_size` bytes, little-endian, with
//! f16 scales. The arithmetic is done in f32 in the same order as ggml's reference
//! `dequantize_row_*`, so results are bit-identical to ggml and to the `gguf` Python package.

use half::f16;
use kvant_plugin_api::Error;
use rayon::prelude::*;

/// Values per K-quant super-block.
const QK_K: usize = 256;

/// The ggml element types kvant dequantizes, with ggml's names.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
    /// 32 values: f16 scale, 32 × int8.
    Q8_0,
    /// 32 values: f16 scale, 4-bit codes centred on 8.
    Q4_0,
    /// 32 values: f16 scale and minimum, 4-bit codes.
    Q4_1,
    /// 32 values: f16 scale, 5-bit codes centred on 16.
    Q5_0,
    /// 32 values: f16 scale and minimum, 5-bit codes.
    Q5_1,
    /// 256 values: 16 sub-blocks with 4-bit scales and mins, 2-bit codes.
    Q2_K,
    /// 256 values: 16 sub-blocks with 6-bit signed scales, 3-bit codes.
    Q3_K,
    /// 256 values: 8 sub-blocks with 6-bit scales and mins, 4-bit codes.
    Q4_K,
    /// 256 values: 8 sub-blocks with 6-bit scales and mins, 5-bit codes.
    Q5_K,
    /// 256 values: 16 sub-blocks with 8-bit signed scales, 6-bit codes.
    Q6_K,
}

impl GgmlType {
    /// Every supported type.
    pub const ALL: [GgmlType; 13] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// The number ggml and GGUF files use for this type (`enum ggml_type`).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// The type with this ggml number, if kvant supports it.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.id() == id)
    }

    /// ggml's name: `F32`, `Q4_K`...
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
        }
    }

    /// Parses ggml's name, case-insensitively (`q4_k`, `Q8_0`, `bf16`).
    pub fn parse(name: &str) -> Option<GgmlType> {
        GgmlType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name.trim()))
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
                32
            }
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
                QK_K
            }
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q8_0 => 2 + 32,
            GgmlType::Q4_0 => 2 + 16,
            GgmlType::Q4_1 => 2 + 2 + 16,
            GgmlType::Q5_0 => 2 + 4 + 16,
            GgmlType::Q5_1 => 2 + 2 + 4 + 16,
            GgmlType::Q2_K => QK_K / 16 + QK_K / 4 + 2 + 2,
            GgmlType::Q3_K => QK_K / 8 + QK_K / 4 + 12 + 2,
            GgmlType::Q4_K => 2 + 2 + 12 + QK_K / 2,
            GgmlType::Q5_K => 2 + 2 + 12 + QK_K / 8 + QK_K / 2,
            GgmlType::Q6_K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
        }
    }

    /// Bytes that `n_elements` values of this type occupy; fails unless `n_elements` is a whole
    /// number of blocks.
    pub fn byte_len(self, n_elements: usize) -> Result<usize, Error> {
        let bs = self.block_size();
        if n_elements % bs != 0 {
            return Err(Error::new(format!(
                "{n_elements} elements are not a whole number of {} blocks of {bs}",
                self.name()
            )));
        }
        (n_elements / bs)
            .checked_mul(self.type_size())
            .ok_or_else(|| {
                Error::new(format!(
                    "{n_elements} {} elements overflow a byte count",
                    self.name()
                ))
            })
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Dequantizes `n_elements` values of type `ty` stored in `bytes` (exactly `ty.byte_len(n_elements)`
/// long) to F32.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>, Error> {
    let mut out = vec![0f32; n_elements];
    dequantize_into(ty, bytes, &mut out)?;
    Ok(out)
}

/// Like [`dequantize`], writing into `out`, whose length is the element count. Large inputs are
/// split across the rayon thread pool.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), Error> {
    let expected = ty.byte_len(out.len())?;
    if bytes.len() != expected {
        return Err(Error::new(format!(
            "{} {} elements need {expected} bytes, got {}",
            out.len(),
            ty.name(),
            bytes.len()
        )));
    }
    // About 64 KiB of output per task: big enough to amortize scheduling, small enough to balance.
    let blocks_per_task = (16 * 1024 / ty.block_size()).max(1);
    bytes
        .par_chunks(blocks_per_task * ty.type_size())
        .zip(out.par_chunks_mut(blocks_per_task * ty.block_size()))
        .for_each(|(b, o)| dequantize_blocks(ty, b, o));
    Ok(())
}

/// Sequentially dequantizes whole blocks; lengths were checked by the caller.
fn dequantize_blocks(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    fn each<const B: usize, const N: usize>(
        bytes: &[u8],
        out: &mut [f32],
        f: fn(&[u8; B], &mut [f32; N]),
    ) {
        for (b, o) in bytes.chunks_exact(B).zip(out.chunks_exact_mut(N)) {
            f(b.try_into().unwrap(), o.try_into().unwrap());
        }
    }
    match ty {
        GgmlType::F32 => each::<4, 1>(bytes, out, |b, o| o[0] = f32::from_le_bytes(*b)),
        GgmlType::F16 => each::<2, 1>(bytes, out, |b, o| o[0] = f16::from_le_bytes(*b).to_f32()),
        // bf16 is the upper half of an f32: widening is exact.
        GgmlType::BF16 => each::<2, 1>(bytes, out, |b, o| {
            o[0] = f32::from_bits((u16::from_le_bytes(*b) as u32) << 16)
        }),
        GgmlType::Q8_0 => each(bytes, out, q8_0),
        GgmlType::Q4_0 => each(bytes, out, q4_0),
        GgmlType::Q4_1 => each(bytes, out, q4_1),
        GgmlType::Q5_0 => each(bytes, out, q5_0),
        GgmlType::Q5_1 => each(bytes, out, q5_1),
        GgmlType::Q2_K => each(bytes, out, q2_k),
        GgmlType::Q3_K => each(bytes, out, q3_k),
        GgmlType::Q4_K => each(bytes, out, q4_k),
        GgmlType::Q5_K => each(bytes, out, q5_k),
        GgmlType::Q6_K => each(bytes, out, q6_k),
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// `d: f16, qs: [i8; 32]`.
fn q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = half_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..]) {
        *y = (q as i8) as f32 * d;
    }
}

/// `d: f16, qs: [u8; 16]`; byte j holds value j (low nibble) and value j+16 (high nibble).
fn q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = half_at(b, 0);
    let (lo, hi) = y.split_at_mut(16);
    for (j, &q) in b[2..].iter().enumerate() {
        lo[j] = ((q & 0xF) as i32 - 8) as f32 * d;
        hi[j] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// `d: f16, m: f16, qs: [u8; 16]`, nibbles as in Q4_0, value = q·d + m.
fn q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let (lo, hi) = y.split_at_mut(16);
    for (j, &q) in b[4..].iter().enumerate() {
        lo[j] = (q & 0xF) as f32 * d + m;
        hi[j] = (q >> 4) as f32 * d + m;
    }
}

/// The fifth bits of a Q5 block: bit j of the little-endian u32 belongs to value j.
fn fifth_bits(qh: &[u8]) -> u32 {
    u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]])
}

/// `d: f16, qh: [u8; 4], qs: [u8; 16]`, value = (q - 16)·d.
fn q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = half_at(b, 0);
    let qh = fifth_bits(&b[2..6]);
    let (lo, hi) = y.split_at_mut(16);
    for (j, &q) in b[6..].iter().enumerate() {
        let q0 = (q & 0xF) as u32 | ((qh >> j) & 1) << 4;
        let q1 = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        lo[j] = (q0 as i32 - 16) as f32 * d;
        hi[j] = (q1 as i32 - 16) as f32 * d;
    }
}

/// `d: f16, m: f16, qh: [u8; 4], qs: [u8; 16]`, value = q·d + m.
fn q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let qh = fifth_bits(&b[4..8]);
    let (lo, hi) = y.split_at_mut(16);
    for (j, &q) in b[8..].iter().enumerate() {
        let q0 = (q & 0xF) as u32 | ((qh >> j) & 1) << 4;
        let q1 = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        lo[j] = q0 as f32 * d + m;
        hi[j] = q1 as f32 * d + m;
    }
}

/// `scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16`.
///
/// Each half (128 values) uses 32 code bytes; the four 2-bit fields of a byte belong to four
/// 32-value runs. Each 16-value sub-block has a scale (low nibble, times d) and a min (high nibble,
/// times dmin): value = d·sc·q - dmin·m.
fn q2_k(b: &[u8; 84], y: &mut [f32; QK_K]) {
    let (scales, qs) = (&b[..16], &b[16..80]);
    let (d, dmin) = (half_at(b, 80), half_at(b, 82));
    for (n, (y, qs)) in y.chunks_exact_mut(128).zip(qs.chunks_exact(32)).enumerate() {
        for (j, y) in y.chunks_exact_mut(32).enumerate() {
            let shift = 2 * j;
            for (h, y) in y.chunks_exact_mut(16).enumerate() {
                let sc = scales[n * 8 + j * 2 + h];
                let dl = d * (sc & 0xF) as f32;
                let ml = dmin * (sc >> 4) as f32;
                for (y, &q) in y.iter_mut().zip(&qs[h * 16..h * 16 + 16]) {
                    *y = dl * ((q >> shift) & 3) as f32 - ml;
                }
            }
        }
    }
}

/// `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16`.
///
/// Codes as in Q2_K plus a third bit from `hmask` (bit 4n+j of byte l for value 128n + 32j + l);
/// a clear bit subtracts 4. The 16 scales are 6-bit, offset by 32: low nibbles in bytes 0..8
/// (scales 0..8 low, 8..16 high nibble), the top two bits in bytes 8..12, two bits per scale.
fn q3_k(b: &[u8; 110], y: &mut [f32; QK_K]) {
    let (hmask, qs, packed) = (&b[..32], &b[32..96], &b[96..108]);
    let d = half_at(b, 108);
    let scale = |i: usize| {
        let low = if i < 8 {
            packed[i] & 0xF
        } else {
            packed[i - 8] >> 4
        };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        (low | high << 4) as i32 - 32
    };
    for (n, (y, qs)) in y.chunks_exact_mut(128).zip(qs.chunks_exact(32)).enumerate() {
        for (j, y) in y.chunks_exact_mut(32).enumerate() {
            let shift = 2 * j;
            let bit = 4 * n + j;
            for (h, y) in y.chunks_exact_mut(16).enumerate() {
                let dl = d * scale(n * 8 + j * 2 + h) as f32;
                for (l, y) in y.iter_mut().enumerate() {
                    let i = h * 16 + l;
                    let low = ((qs[i] >> shift) & 3) as i32;
                    let sub = if (hmask[i] >> bit) & 1 == 0 { 4 } else { 0 };
                    *y = dl * (low - sub) as f32;
                }
            }
        }
    }
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes of Q4_K/Q5_K: sub-blocks 0..4
/// keep 6 bits in bytes j and j+4; sub-blocks 4..8 keep their low 4 bits in byte j+4 and their
/// top 2 bits in the spare top bits of bytes j-4 (scale) and j (min).
fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | (s[j - 4] >> 6) << 4,
            (s[j + 4] >> 4) | (s[j] >> 6) << 4,
        )
    };
    (sc as f32, m as f32)
}

/// `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`.
///
/// Each 64-value run uses 32 code bytes: low nibbles are the first 32 values (sub-block 2k), high
/// nibbles the next 32 (sub-block 2k+1). value = d·sc·q - dmin·m.
fn q4_k(b: &[u8; 144], y: &mut [f32; QK_K]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..]);
    for (k, (y, qs)) in y.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * k, scales);
        let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
        let (d1, min1, d2, min2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        let (lo, hi) = y.split_at_mut(32);
        for (l, &q) in qs.iter().enumerate() {
            lo[l] = d1 * (q & 0xF) as f32 - min1;
            hi[l] = d2 * (q >> 4) as f32 - min2;
        }
    }
}

/// `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`: Q4_K plus a fifth bit,
/// bit 2k (first 32 values of run k) or 2k+1 (next 32) of byte l of `qh`.
fn q5_k(b: &[u8; 176], y: &mut [f32; QK_K]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..]);
    for (k, (y, qs)) in y.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * k, scales);
        let (sc2, m2) = scale_min_k4(2 * k + 1, scales);
        let (d1, min1, d2, min2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        let (lo, hi) = y.split_at_mut(32);
        for (l, (&q, &h)) in qs.iter().zip(qh).enumerate() {
            let q0 = (q & 0xF) | ((h >> (2 * k)) & 1) << 4;
            let q1 = (q >> 4) | ((h >> (2 * k + 1)) & 1) << 4;
            lo[l] = d1 * q0 as f32 - min1;
            hi[l] = d2 * q1 as f32 - min2;
        }
    }
}

/// `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`.
///
/// Per 128-value half: 64 `ql` bytes (low nibbles of values l and l+32 in bytes l and l+32, high
/// nibbles of values l+64 and l+96) and 32 `qh` bytes (the four 2-bit top parts of values l, l+32,
/// l+64, l+96). value = d·sc·(q - 32), one signed scale per 16 values.
fn q6_k(b: &[u8; 210], y: &mut [f32; QK_K]) {
    let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
    let d = half_at(b, 208);
    for (n, y) in y.chunks_exact_mut(128).enumerate() {
        let (ql, qh, sc) = (
            &ql[n * 64..n * 64 + 64],
            &qh[n * 32..n * 32 + 32],
            &scales[n * 8..n * 8 + 8],
        );
        let scale = |i: usize| d * (sc[i] as i8) as f32;
        for l in 0..32 {
            let is = l / 16;
            let q = [
                (ql[l] & 0xF) | (qh[l] & 3) << 4,
                (ql[l + 32] & 0xF) | ((qh[l] >> 2) & 3) << 4,
                (ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4,
                (ql[l + 32] >> 4) | (qh[l] >> 6) << 4,
            ];
            for (r, &q) in q.iter().enumerate() {
                y[l + 32 * r] = scale(is + 2 * r) * (q as i32 - 32) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_names_and_sizes_are_consistent() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(GgmlType::parse(&t.name().to_lowercase()), Some(t));
        }
        assert_eq!(GgmlType::from_id(16), None);
        assert_eq!(GgmlType::Q4_K.type_size(), 144);
        assert_eq!(GgmlType::Q6_K.type_size(), 210);
        assert_eq!(GgmlType::Q2_K.type_size(), 84);
        assert_eq!(GgmlType::Q3_K.type_size(), 110);
        assert_eq!(GgmlType::Q5_K.type_size(), 176);
    }

    #[test]
    fn lengths_are_checked() {
        assert!(dequantize(GgmlType::Q4_0, &[0; 18], 16).is_err());
        assert!(dequantize(GgmlType::Q4_0, &[0; 17], 32).is_err());
        assert_eq!(
            dequantize(GgmlType::Q4_0, &[0; 36], 64).unwrap(),
            vec![0.0; 64]
        );
    }

    #[test]
    fn q4_1_known_block() {
        // d = 0.5, m = -1, codes 0..15 then 15..0.
        let mut b = vec![0u8; 20];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16 {
            b[4 + j] = j as u8 | ((15 - j as u8) << 4);
        }
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        assert_eq!(y[0], -1.0);
        assert_eq!(y[15], 6.5);
        assert_eq!(y[16], 6.5);
        assert_eq!(y[31], -1.0);
    }
}
