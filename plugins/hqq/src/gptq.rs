//! The opt-in GPTQ export (`export_format = "gptq"`): HQQ's fit stored in the GPTQ checkpoint
//! layout (`quant_method` `gptq`, asymmetric, no act-order) that GPTQModel, transformers
//! (through GPTQModel) and vLLM load; `plugins/gptq/scripts/check-gptqmodel.py` proves it with GPTQModel.
//!
//! The layout, per converted Linear `P` (the bits of [`kvant_intpack`], shared with the `gptq`
//! plugin): `P.qweight` I32 `[in*bits/32, out]`, `P.qzeros` I32 `[groups, out*bits/32]`,
//! `P.scales` F16 `[groups, out]`, `P.g_idx` I32 `[in]` (`i / group_size`), `P.bias` F16;
//! weight `(q - zero) * scale`. `checkpoint_format` `gptq_v2` (the default) stores `zero`;
//! `gptq` (v1) stores `zero - 1`, which loaders undo by adding 1 with carries, so v1 zeros start
//! at 1. Which one: GPTQModel 7.7 refuses asymmetric v1 checkpoints it did not write itself
//! (old AutoGPTQ ones wrapped zero 0 to 15), so v2 is the one it and transformers load; vLLM's
//! GPTQ kernel reads v1, and v2 where it has the `use_v2_format` switch. The solver runs with
//! integer zeros in the storable range and F16 scales. Groups are consecutive inputs of one row (hqq's axis 1), the
//! last one short when `in % group_size != 0`; both widths must be multiples of 32.

use kvant_intpack as intpack;
use kvant_plugin_api::{DType, Error, ModuleTensors, Result, Tensor, TensorSpec};
use rayon::prelude::*;

use crate::solver::{fit_group, SolverParams, StoredAs};

/// The zero points a layout can hold: from 1 in v1, which stores `zero - 1` unsigned.
pub fn stored(v1: bool) -> StoredAs {
    StoredAs { min_zero: if v1 { 1.0 } else { 0.0 } }
}

/// One row's codes, its groups' (scale, zero), and its squared error.
type RowFit = (Vec<u8>, Vec<(f32, u8)>, f64);

/// Sizes of one Linear in the GPTQ layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptqLayout {
    /// Output features.
    pub out: usize,
    /// Input features.
    pub inp: usize,
    /// Bits per code: 2, 3, 4 or 8.
    pub bits: u32,
    /// Inputs per group.
    pub group_size: usize,
    /// `checkpoint_format` `gptq` (v1, `qzeros` holds `zero - 1`) rather than `gptq_v2`.
    pub v1: bool,
}

impl GptqLayout {
    /// The layout of an `out x inp` weight, or an error saying why GPTQ's cannot hold it.
    pub fn new(out: usize, inp: usize, bits: u32, group_size: usize, v1: bool) -> Result<GptqLayout> {
        if ![2, 3, 4, 8].contains(&bits) {
            return Err(Error::new(format!("the GPTQ layout holds 2, 3, 4 or 8 bits, not {bits}")));
        }
        if !out.is_multiple_of(32) || !inp.is_multiple_of(32) || group_size == 0 {
            return Err(Error::new(format!(
                "the GPTQ layout packs 32 values per word run: a {out}x{inp} weight needs both widths multiples of 32"
            )));
        }
        Ok(GptqLayout { out, inp, bits, group_size, v1 })
    }

    /// Groups per row (the last may be short).
    pub fn groups(&self) -> usize {
        self.inp.div_ceil(self.group_size)
    }

    /// The tensors of a module, bias last when present.
    pub fn specs(&self, bias: bool) -> Vec<TensorSpec> {
        let (bits, g) = (self.bits as usize, self.groups());
        let mut specs = vec![
            TensorSpec::new("qweight", DType::I32, [self.inp * bits / 32, self.out]),
            TensorSpec::new("qzeros", DType::I32, [g, self.out * bits / 32]),
            TensorSpec::new("scales", DType::F16, [g, self.out]),
            TensorSpec::new("g_idx", DType::I32, [self.inp]),
        ];
        if bias {
            specs.push(TensorSpec::new("bias", DType::F16, [self.out]));
        }
        specs
    }

    /// Quantizes a row-major `[out, inp]` weight: the tensors (bias excluded) and the squared
    /// reconstruction error.
    pub fn quantize(&self, w: &[f32], params: &SolverParams) -> (Vec<Tensor>, f64) {
        let (out, inp, g) = (self.out, self.inp, self.group_size);
        assert_eq!(w.len(), out * inp);
        let params = SolverParams { integer_zero: true, stored: Some(stored(self.v1)), ..*params };
        let rows: Vec<RowFit> = w
            .par_chunks(inp)
            .map(|row| {
                let mut codes = vec![0u8; inp];
                let mut fits = Vec::with_capacity(self.groups());
                let mut err = 0.0;
                for (group, c) in row.chunks(g).zip(codes.chunks_mut(g)) {
                    let f = fit_group(group, &params, c);
                    fits.push((1.0 / f.inv_scale, f.zero as u8));
                    err += f.sq_error;
                }
                (codes, fits, err)
            })
            .collect();
        let groups = self.groups();
        let mut codes_t = vec![0u8; inp * out];
        let (mut zeros, mut scales) = (vec![0u8; groups * out], vec![0f32; groups * out]);
        for (o, (codes, fits, _)) in rows.iter().enumerate() {
            for (i, &c) in codes.iter().enumerate() {
                codes_t[i * out + o] = c;
            }
            for (k, &(s, z)) in fits.iter().enumerate() {
                (scales[k * out + o], zeros[k * out + o]) = (s, z);
            }
        }
        let as_i32 = |w: Vec<u32>| w.into_iter().map(|v| v as i32).collect::<Vec<i32>>();
        let bits = self.bits as usize;
        let g_idx: Vec<i32> = (0..inp).map(|i| (i / g) as i32).collect();
        let tensors = vec![
            Tensor::from_slice("qweight", DType::I32, [inp * bits / 32, out], &as_i32(intpack::pack_qweight(&codes_t, inp, out, self.bits))),
            Tensor::from_slice("qzeros", DType::I32, [groups, out * bits / 32], &as_i32(intpack::pack_qzeros(&zeros, groups, out, self.bits, self.v1 as u32))),
            Tensor::from_f32_as("scales", DType::F16, [groups, out], &scales),
            Tensor::from_slice("g_idx", DType::I32, [inp], &g_idx),
        ];
        (tensors, rows.iter().map(|r| r.2).sum())
    }
}

/// A module's GPTQ tensors read back, checked against each other.
pub struct GptqPacked {
    /// Sizes, from `qweight`'s shape and the bits.
    pub layout: GptqLayout,
    qweight: Vec<u32>,
    /// `[groups, out]`, the true zero points (v1's stored `zero - 1` corrected).
    zeros: Vec<f32>,
    scales: Vec<f32>,
    g_idx: Vec<usize>,
}

impl GptqPacked {
    /// Reads a module's tensors written at `bits` bits, in v1 or v2.
    pub fn read(module: &ModuleTensors<'_>, bits: u32, v1: bool) -> Result<GptqPacked> {
        let name = &module.plan.name;
        let bad = |what: String| Error::new(format!("GPTQ module `{name}`: {what}"));
        let (qw, qz, sc, gi) = (module.get("qweight")?, module.get("qzeros")?, module.get("scales")?, module.get("g_idx")?);
        let (words, out) = match qw.shape {
            [w, o] if qw.dtype == DType::I32 => (*w, *o),
            _ => return Err(bad(format!("qweight is {} {:?}, expected I32 [in*bits/32, out]", qw.dtype, qw.shape))),
        };
        let inp = words * 32 / bits as usize;
        let groups = match sc.shape {
            [g, o] if *o == out && *g > 0 => *g,
            _ => return Err(bad(format!("scales {:?} do not match qweight {:?}", sc.shape, qw.shape))),
        };
        let layout = GptqLayout::new(out, inp, bits, inp.div_ceil(groups), v1).map_err(|e| bad(e.to_string()))?;
        let row = out * bits as usize / 32;
        if qz.dtype != DType::I32 || qz.shape != [groups, row] {
            return Err(bad(format!("qzeros is {} {:?}, expected I32 [{groups}, {row}]", qz.dtype, qz.shape)));
        }
        let g_idx: Vec<usize> = gi.to_f32().into_iter().map(|g| g as usize).collect();
        if g_idx.len() != inp || g_idx.iter().any(|&g| g >= groups) {
            return Err(bad(format!("g_idx has {} entries (expected {inp}) or names a group beyond {groups}", g_idx.len())));
        }
        let qz: Vec<u32> = qz.cast::<u32>()?.into_owned();
        let zeros = (0..groups * out).map(|k| (intpack::get(&qz, k / out * row, 1, k % out, bits) + v1 as u32) as f32).collect();
        Ok(GptqPacked { layout, qweight: qw.cast::<u32>()?.into_owned(), zeros, scales: sc.to_f32(), g_idx })
    }

    /// The dense `[out, in]` weight.
    pub fn dequantize(&self) -> Vec<f32> {
        let GptqLayout { out, inp, bits, .. } = self.layout;
        let mut w = vec![0f32; out * inp];
        w.par_chunks_mut(inp).enumerate().for_each(|(o, row)| {
            let mut codes = [0u8; 32];
            for (p, dst) in row.chunks_mut(32).enumerate() {
                intpack::unpack_block(&self.qweight, out, o, p, bits, &mut codes);
                for (k, v) in dst.iter_mut().enumerate() {
                    let g = self.g_idx[p * 32 + k] * out + o;
                    *v = (codes[k] as f32 - self.zeros[g]) * self.scales[g];
                }
            }
        });
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvant_plugin_api::{ModulePlan, TensorView};

    fn weights(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                0.05 * (((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5)
            })
            .collect()
    }

    fn read_back(l: &GptqLayout, tensors: &[Tensor]) -> GptqPacked {
        let plan = ModulePlan { name: "m".into(), shape: (l.out, l.inp), tensors: l.specs(false), attrs: serde_json::Value::Null };
        let views: Vec<TensorView<'_>> = tensors.iter().map(Tensor::view).collect();
        GptqPacked::read(&ModuleTensors { plan: &plan, tensors: &views }, l.bits, l.v1).unwrap()
    }

    #[test]
    fn round_trip_matches_the_reported_error_and_zeros_are_storable() {
        for (bits, g, v1) in [(4, 64, false), (4, 64, true), (3, 64, true), (2, 32, false), (8, 128, true), (4, 80, false)] {
            let l = GptqLayout::new(64, 160, bits, g, v1).unwrap();
            let mut w = weights(64 * 160, bits as u64);
            // A row of non-negative weights wants zero 0, which v1 cannot store.
            w[..160].iter_mut().for_each(|v| *v = v.abs());
            let (tensors, sq) = l.quantize(&w, &SolverParams { nbits: bits, ..Default::default() });
            for (t, spec) in tensors.iter().zip(l.specs(false)) {
                assert_eq!((t.name.as_str(), t.dtype, &t.shape), (spec.name.as_str(), spec.dtype, &spec.shape));
            }
            let p = read_back(&l, &tensors);
            let lowest = p.zeros.iter().fold(f32::INFINITY, |m, &z| m.min(z));
            assert!(p.zeros.iter().all(|&z| z < (1 << bits) as f32), "{bits} bits: a zero above maxq");
            assert_eq!(lowest, v1 as u32 as f32, "{bits} bits, v1 {v1}: the non-negative row's zero");
            let back = p.dequantize();
            let err: f64 = back.iter().zip(&w).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            assert!((err - sq).abs() <= 1e-3 * sq, "{bits} bits g{g}: dequantized error {err} vs reported {sq}");
            assert_eq!(p.g_idx[159], 159 / g, "{bits} bits g{g}: short last group");
        }
    }

    #[test]
    fn refuses_what_the_layout_cannot_hold() {
        assert!(GptqLayout::new(64, 100, 4, 64, false).unwrap_err().to_string().contains("64x100"));
        assert!(GptqLayout::new(64, 64, 1, 64, false).is_err());
    }
}
