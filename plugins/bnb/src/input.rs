//! Reading F32 / F16 / BF16 weights straight from little-endian bytes.

use kvant_plugin_api::{DType, Error};

/// A run of floating-point elements as the host hands them over: a dtype and raw bytes
/// (not necessarily aligned, so they are decoded rather than cast).
#[derive(Clone, Copy, Debug)]
pub struct Floats<'a> {
    dtype: DType,
    bytes: &'a [u8],
}

impl<'a> Floats<'a> {
    /// Wraps `bytes` holding elements of `dtype`, which must be F32, F16 or BF16.
    pub fn new(dtype: DType, bytes: &'a [u8]) -> Result<Self, Error> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::new(format!("bitsandbytes quantizes F32, F16 or BF16 weights, not {dtype}")));
        }
        if !bytes.len().is_multiple_of(dtype.size()) {
            return Err(Error::new(format!("{} bytes is not a whole number of {dtype} elements", bytes.len())));
        }
        Ok(Floats { dtype, bytes })
    }

    /// Wraps an F32 slice.
    pub fn from_f32(values: &'a [f32]) -> Self {
        // SAFETY: f32 has no padding and any byte pattern is a valid u8.
        let bytes = unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) };
        Floats { dtype: DType::F32, bytes }
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Elements `start..start + dst.len()`, widened exactly to F32.
    #[inline(always)]
    pub fn load(&self, start: usize, dst: &mut [f32]) {
        let size = self.dtype.size();
        let src = &self.bytes[start * size..(start + dst.len()) * size];
        match self.dtype {
            DType::F32 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                    *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                }
            }
            DType::BF16 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = f32::from_bits((u16::from_le_bytes([s[0], s[1]]) as u32) << 16);
                }
            }
            DType::F16 => {
                // Through a small buffer so the slice conversion can use F16C.
                use half::slice::HalfFloatSliceExt;
                let mut buf = [half::f16::ZERO; 256];
                for (d, s) in dst.chunks_mut(256).zip(src.chunks(512)) {
                    let h = &mut buf[..d.len()];
                    for (h, s) in h.iter_mut().zip(s.chunks_exact(2)) {
                        *h = half::f16::from_bits(u16::from_le_bytes([s[0], s[1]]));
                    }
                    h.convert_to_f32_slice(d);
                }
            }
            _ => unreachable!("checked in Floats::new"),
        }
    }

    /// All elements as F32.
    pub fn to_vec(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.len()];
        self.load(0, &mut v);
        v
    }
}

/// Rounds F32 values to `dtype` (F32, F16 or BF16, round-to-nearest-even) as little-endian bytes.
pub fn encode(values: &[f32], dtype: DType) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        DType::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => {
            use half::slice::HalfFloatSliceExt;
            let mut h = vec![half::f16::ZERO; values.len()];
            h.convert_from_f32_slice(values);
            h.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
        DType::BF16 => values.iter().for_each(|&v| out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes())),
        other => return Err(Error::new(format!("cannot write {other} weights; use F32, F16 or BF16"))),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widens_every_float_dtype_exactly() {
        let bf = half::bf16::from_f32(-1.5).to_le_bytes();
        let h = half::f16::from_f32(0.333).to_le_bytes();
        let mut out = [0f32; 1];
        Floats::new(DType::BF16, &bf).unwrap().load(0, &mut out);
        assert_eq!(out[0], -1.5);
        Floats::new(DType::F16, &h).unwrap().load(0, &mut out);
        assert_eq!(out[0], half::f16::from_f32(0.333).to_f32());
        assert_eq!(Floats::from_f32(&[1.0, 2.0]).to_vec(), [1.0, 2.0]);
        assert!(Floats::new(DType::I8, &[0]).is_err());
        assert!(Floats::new(DType::F32, &[0, 0]).is_err());
    }

    #[test]
    fn encodes_round_to_nearest_even() {
        // 1 + 2^-8 is halfway between two BF16 values: ties go to the even one, 1.0.
        let v = 1.0 + 2f32.powi(-8);
        assert_eq!(encode(&[v], DType::BF16).unwrap(), half::bf16::from_f32(1.0).to_le_bytes());
    }
}
