//! The hqq library's per-Linear layout, as `HQQLinear.state_dict()` writes it for safetensors
//! (hqq 0.2.8), and arithmetic on it.
//!
//! hqq reshapes the flattened `[out, in]` weight to a code matrix: `[numel / g, g]` for axis 1
//! (each row one group of `g` consecutive weights) or `[g, numel / g]` for axis 0 (each column
//! one group of weights `numel / g` apart). Groups therefore follow the flattened weight, not
//! its rows: with axis 1 and `in % g != 0` a group spans two rows, as in hqq.
//!
//! Tensors of one module (names relative to it):
//! - `W_q`: the code matrix packed by [`crate::bitpack`] (U8, or I32 for 3 bits);
//! - `scale` (the dequantization multiplier, `1 / inv_scale`) and `zero`: compute dtype,
//!   `[numel / g, 1]` for axis 1, `[1, numel / g]` for axis 0;
//! - `shape` I64 `[2]`; `nbits`, `group_size`, `axis` I32 scalars;
//! - `packing`, `unpack_view_dtype`, `compute_dtype`: ASCII strings as U8 vectors
//!   (`4bit_u8`, `torch.uint8`, `torch.float16`);
//! - U8 scalar flags `view_as_float`, `quant_scale`, `quant_zero`, `offload_meta`,
//!   `encoded_state_dict`, `stores_quant_config`, `channel_wise`, `optimize`, `round_zero`;
//! - `bias`, in the compute dtype, when the Linear has one.
//!
//! Dequantized weight: `(code - zero) * scale`, reshaped to `shape`.

use kvant_plugin_api::{DType, Error, Result, Tensor, TensorSpec, TensorView};
use rayon::prelude::*;

use crate::bitpack::Packing;
use crate::solver::{fit_group, SolverParams};

/// Groups handed to one rayon task: enough work to amortise scheduling.
const GROUPS_PER_TASK: usize = 64;

/// Sizes of one quantized Linear in hqq's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Output features.
    pub out: usize,
    /// Input features.
    pub inp: usize,
    /// Bit packing (from nbits).
    pub packing: Packing,
    /// Weights per group.
    pub group_size: usize,
    /// 1: groups of consecutive weights; 0: groups strided across the flattened weight.
    pub axis: u32,
}

impl Layout {
    /// The layout of an `out x inp` weight, or an error saying why hqq cannot store it.
    pub fn new(out: usize, inp: usize, nbits: u32, group_size: usize, axis: u32) -> Result<Layout> {
        let packing = Packing::new(nbits).ok_or_else(|| Error::new(format!("nbits {nbits} is not one of 1, 2, 3, 4, 8")))?;
        let layout = Layout { out, inp, packing, group_size, axis };
        let numel = out * inp;
        if group_size == 0 || numel % group_size != 0 {
            return Err(Error::new(format!(
                "a {out}x{inp} weight ({numel} values) does not split into groups of {group_size}, which hqq requires"
            )));
        }
        if packing.packed_rows(layout.code_rows()).is_none() {
            return Err(Error::new(format!(
                "hqq's {} packing needs the {} code rows of a {out}x{inp} weight (group {group_size}, axis {axis}) \
                 to be a multiple of {}",
                packing.name(),
                layout.code_rows(),
                packing.per_word()
            )));
        }
        Ok(layout)
    }

    /// Number of groups (of scales and zeros).
    pub fn groups(&self) -> usize {
        self.out * self.inp / self.group_size
    }

    /// Rows of the code matrix.
    pub fn code_rows(&self) -> usize {
        if self.axis == 1 {
            self.groups()
        } else {
            self.group_size
        }
    }

    /// Columns of the code matrix.
    pub fn code_cols(&self) -> usize {
        if self.axis == 1 {
            self.group_size
        } else {
            self.groups()
        }
    }

    /// Dtype and shape of `W_q`.
    pub fn w_q_spec(&self) -> TensorSpec {
        let dtype = if self.packing.nbits == 3 { DType::I32 } else { DType::U8 };
        TensorSpec::new("W_q", dtype, [self.packing.packed_rows(self.code_rows()).unwrap(), self.code_cols()])
    }

    /// Shape of `scale` and `zero`.
    pub fn meta_shape(&self) -> [usize; 2] {
        if self.axis == 1 {
            [self.groups(), 1]
        } else {
            [1, self.groups()]
        }
    }

    /// Quantizes a row-major `[out, inp]` weight: packed `W_q` bytes, `scale`, `zero`, and the
    /// squared reconstruction error.
    pub fn quantize(&self, w: &[f32], params: &SolverParams) -> (Vec<u8>, Vec<f32>, Vec<f32>, f64) {
        assert_eq!(w.len(), self.out * self.inp);
        let g = self.group_size;
        // Groups as contiguous rows: the weight itself for axis 1, its transpose for axis 0.
        let grouped: std::borrow::Cow<[f32]> = if self.axis == 1 { w.into() } else { transpose(w, g, self.groups()).into() };
        let mut codes = vec![0u8; w.len()];
        let fits: Vec<_> = grouped
            .par_chunks(g)
            .zip(codes.par_chunks_mut(g))
            .with_min_len(GROUPS_PER_TASK)
            .map(|(group, codes)| fit_group(group, params, codes))
            .collect();
        if self.axis == 0 {
            codes = transpose(&codes, self.groups(), g);
        }
        let packed = self.packing.pack(&codes, self.code_rows(), self.code_cols());
        let scale = fits.iter().map(|f| 1.0 / f.inv_scale).collect();
        let zero = fits.iter().map(|f| f.zero).collect();
        (packed, scale, zero, fits.iter().map(|f| f.sq_error).sum())
    }
}

/// Transposes a row-major `rows x cols` matrix.
fn transpose<T: Copy + Default + Send + Sync>(m: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut t = vec![T::default(); m.len()];
    t.par_chunks_mut(rows.max(1)).enumerate().for_each(|(c, col)| {
        for (r, v) in col.iter_mut().enumerate() {
            *v = m[r * cols + c];
        }
    });
    t
}

/// A quantized Linear read back from its tensors: layout, packed codes, scales and zeros.
pub struct Packed<'a> {
    /// Sizes, from the `shape`, `nbits`, `group_size` and `axis` tensors.
    pub layout: Layout,
    /// `W_q`'s bytes.
    pub w_q: &'a [u8],
    /// Per-group multipliers.
    pub scale: Vec<f32>,
    /// Per-group zero points.
    pub zero: Vec<f32>,
}

fn int_scalar(t: &TensorView<'_>, module: &str) -> Result<i64> {
    let v = t.to_f32();
    match v[..] {
        [x] if x.fract() == 0.0 => Ok(x as i64),
        _ => Err(Error::new(format!("`{module}.{}` is not an integer scalar: {:?} {:?}", t.name, t.dtype, t.shape))),
    }
}

/// A U8 vector of ASCII as a string (hqq's encoding of strings).
pub fn ascii(t: &TensorView<'_>) -> String {
    t.data.iter().map(|&b| b as char).collect()
}

impl<'a> Packed<'a> {
    /// Reads a module's hqq tensors, checking they agree with each other. `get` returns the
    /// tensor of that name or an error naming the module.
    pub fn read(module: &str, get: impl Fn(&str) -> Result<TensorView<'a>>) -> Result<Packed<'a>> {
        let shape = get("shape")?.to_f32();
        let (out, inp) = match shape[..] {
            [o, i] => (o as usize, i as usize),
            _ => return Err(Error::new(format!("`{module}.shape` is {shape:?}, expected [out, in]"))),
        };
        let nbits = int_scalar(&get("nbits")?, module)? as u32;
        let group_size = int_scalar(&get("group_size")?, module)?;
        let axis = int_scalar(&get("axis")?, module)? as u32;
        if axis > 1 || group_size <= 0 {
            return Err(Error::new(format!("`{module}`: axis {axis}, group_size {group_size} are not hqq's")));
        }
        let layout = Layout::new(out, inp, nbits, group_size as usize, axis).map_err(|e| Error::new(format!("`{module}`: {e}")))?;
        if let Ok(p) = get("packing") {
            if ascii(&p) != layout.packing.name() {
                return Err(Error::new(format!("`{module}`: packing `{}` is not supported (expected `{}`)", ascii(&p), layout.packing.name())));
            }
        }
        if let Ok(v) = get("view_as_float") {
            if v.data.iter().any(|&b| b != 0) {
                return Err(Error::new(format!("`{module}`: W_q stored with view_as_float is not supported")));
            }
        }
        let w_q = get("W_q")?;
        let spec = layout.w_q_spec();
        if w_q.dtype.size() != spec.dtype.size() || w_q.shape != spec.shape {
            return Err(Error::new(format!(
                "`{module}.W_q` is {} {:?}, expected {} {:?} for {out}x{inp} at {nbits} bits, group {group_size}, axis {axis}",
                w_q.dtype, w_q.shape, spec.dtype, spec.shape
            )));
        }
        let (scale, zero) = (get("scale")?, get("zero")?);
        for t in [&scale, &zero] {
            if !t.dtype.is_float() || t.numel() != layout.groups() {
                return Err(Error::new(format!(
                    "`{module}.{}` is {} {:?}, expected {} float values",
                    t.name, t.dtype, t.shape, layout.groups()
                )));
            }
        }
        Ok(Packed { layout, w_q: w_q.data, scale: scale.to_f32(), zero: zero.to_f32() })
    }

    /// Dequantizes weights `start .. start + out.len()` of the flattened `[out, in]` weight.
    pub fn dequantize_range(&self, start: usize, out: &mut [f32]) {
        let l = &self.layout;
        let (rows, cols) = (l.code_rows(), l.code_cols());
        let mut codes = vec![0u8; out.len().min(cols)];
        let mut done = 0;
        while done < out.len() {
            let idx = start + done;
            let (r, c) = (idx / cols, idx % cols);
            let n = (cols - c).min(out.len() - done);
            l.packing.unpack_at(self.w_q, rows, cols, r, c, &mut codes[..n]);
            let dst = &mut out[done..done + n];
            if l.axis == 1 {
                let (z, s) = (self.zero[r], self.scale[r]);
                for (d, &q) in dst.iter_mut().zip(&codes[..n]) {
                    *d = (q as f32 - z) * s;
                }
            } else {
                let (z, s) = (&self.zero[c..c + n], &self.scale[c..c + n]);
                for (((d, &q), &z), &s) in dst.iter_mut().zip(&codes[..n]).zip(z).zip(s) {
                    *d = (q as f32 - z) * s;
                }
            }
            done += n;
        }
    }

    /// The dense `[out, in]` weight.
    pub fn dequantize(&self) -> Vec<f32> {
        let l = &self.layout;
        let mut w = vec![0f32; l.out * l.inp];
        w.par_chunks_mut(l.inp.max(1)).enumerate().for_each(|(o, row)| self.dequantize_range(o * l.inp, row));
        w
    }
}

/// A string as hqq encodes it: its ASCII bytes as a U8 vector.
pub fn string_tensor(name: &str, s: &str) -> Tensor {
    Tensor::from_slice(name, DType::U8, [s.len()], s.as_bytes())
}

/// A U8 scalar flag.
pub fn flag_tensor(name: &str, v: bool) -> Tensor {
    Tensor::from_slice(name, DType::U8, Vec::<usize>::new(), &[v as u8])
}

/// An I32 scalar.
pub fn i32_tensor(name: &str, v: i32) -> Tensor {
    Tensor::from_slice(name, DType::I32, Vec::<usize>::new(), &[v])
}
