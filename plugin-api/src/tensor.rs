//! Tensors as they cross between host and plugin: a dtype, a shape and little-endian bytes.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Element type of a tensor, named as safetensors names it.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, abi_stable::StableAbi)]
pub enum DType {
    /// 32-bit IEEE float.
    F32 = 0,
    /// 16-bit IEEE float.
    F16 = 1,
    /// bfloat16: the upper half of an F32.
    BF16 = 2,
    /// Signed 8-bit integer.
    I8 = 3,
    /// Unsigned 8-bit integer (also used for raw packed bytes).
    U8 = 4,
    /// Signed 16-bit integer.
    I16 = 5,
    /// Signed 32-bit integer.
    I32 = 6,
    /// Signed 64-bit integer.
    I64 = 7,
    /// Boolean, one byte per element.
    BOOL = 8,
    /// 64-bit IEEE float.
    F64 = 9,
    /// Unsigned 16-bit integer.
    U16 = 10,
    /// Unsigned 32-bit integer.
    U32 = 11,
}

impl DType {
    /// Every dtype, in discriminant order.
    pub const ALL: [DType; 12] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I8,
        DType::U8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::BOOL,
        DType::F64,
        DType::U16,
        DType::U32,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 | DType::BOOL => 1,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }

    /// The safetensors spelling: `F32`, `BF16`, `U8`...
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::I16 => "I16",
            DType::I32 => "I32",
            DType::I64 => "I64",
            DType::BOOL => "BOOL",
            DType::F64 => "F64",
            DType::U16 => "U16",
            DType::U32 => "U32",
        }
    }

    /// Parses the safetensors spelling (case-insensitive), or the PyTorch one
    /// (`float32`, `bfloat16`, `float16`...).
    pub fn parse(s: &str) -> Option<DType> {
        let s = s.trim().to_ascii_lowercase();
        let s = s.strip_prefix("torch.").unwrap_or(&s);
        Some(match s {
            "f32" | "float32" | "float" => DType::F32,
            "f16" | "float16" | "half" => DType::F16,
            "bf16" | "bfloat16" => DType::BF16,
            "i8" | "int8" => DType::I8,
            "u8" | "uint8" => DType::U8,
            "i16" | "int16" => DType::I16,
            "i32" | "int32" => DType::I32,
            "i64" | "int64" => DType::I64,
            "bool" => DType::BOOL,
            "f64" | "float64" | "double" => DType::F64,
            "u16" | "uint16" => DType::U16,
            "u32" | "uint32" => DType::U32,
            _ => return None,
        })
    }

    /// The PyTorch spelling used in Hugging Face JSON files (`bfloat16`, `float32`...).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::BOOL => "bool",
            DType::F64 => "float64",
            DType::U16 => "uint16",
            DType::U32 => "uint32",
        }
    }

    /// True for F32, F16, BF16 and F64.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Name, dtype and shape of a tensor, without its data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Name relative to the module, e.g. `qweight` or `weight.absmax`.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost dimension first. A scalar has an empty shape.
    pub shape: Vec<usize>,
    /// Set in a plan for a 1-D tensor whose length only `quantize` settles (contract 1.2), such
    /// as JSON text that holds a number found while quantizing: `shape` is then `[max]`, the
    /// most elements it may have, and `quantize` may return any length up to it. Build it with
    /// [`TensorSpec::variable`]. A 1.1 host ignores the flag and refuses a shorter tensor, so a
    /// method that plans one declares `host:>=1.2` in `required_packages`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub variable_length: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl TensorSpec {
    /// Builds a spec of a fixed shape.
    pub fn new(name: impl Into<String>, dtype: DType, shape: impl Into<Vec<usize>>) -> Self {
        TensorSpec { name: name.into(), dtype, shape: shape.into(), variable_length: false }
    }

    /// Builds the spec of a 1-D tensor of at most `max_len` elements, its length settled by
    /// `quantize` (see [`variable_length`](Self::variable_length)).
    pub fn variable(name: impl Into<String>, dtype: DType, max_len: usize) -> Self {
        TensorSpec { name: name.into(), dtype, shape: vec![max_len], variable_length: true }
    }

    /// True when a tensor of `dtype` and `shape` is what this spec announces: the same dtype and
    /// shape, or for a variable-length spec a 1-D shape no longer than the bound.
    pub fn admits(&self, dtype: DType, shape: &[usize]) -> bool {
        dtype == self.dtype
            && match (self.variable_length, shape, self.shape.as_slice()) {
                (true, [len], [max]) => len <= max,
                (true, _, _) => false,
                (false, _, _) => shape == self.shape.as_slice(),
            }
    }

    /// Number of elements (1 for a scalar); the bound for a variable-length spec.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the data in bytes; the most it may take for a variable-length spec.
    pub fn byte_len(&self) -> usize {
        self.numel() * self.dtype.size()
    }
}

/// A borrowed tensor: the host hands plugins views straight into memory-mapped checkpoints.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    /// Name relative to the module (`weight`, `bias`, `qweight`...).
    pub name: &'a str,
    /// Element type of `data`.
    pub dtype: DType,
    /// Shape, outermost first.
    pub shape: &'a [usize],
    /// Little-endian element bytes, `numel * dtype.size()` long.
    pub data: &'a [u8],
}

impl<'a> TensorView<'a> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The elements as F32, converting from F16/BF16/F64/integers as needed.
    pub fn to_f32(&self) -> Vec<f32> {
        to_f32(self.dtype, self.data)
    }

    /// The data as `&[f32]` without a copy when it is F32 and suitably aligned, else converted.
    pub fn as_f32(&self) -> Cow<'a, [f32]> {
        if self.dtype == DType::F32 {
            if let Ok(s) = bytemuck::try_cast_slice::<u8, f32>(self.data) {
                return Cow::Borrowed(s);
            }
        }
        Cow::Owned(self.to_f32())
    }

    /// The elements reinterpreted as `T` (copied when the bytes are unaligned).
    /// Fails when the dtype's size does not match `T`'s.
    pub fn cast<T: bytemuck::Pod>(&self) -> Result<Cow<'a, [T]>, crate::Error> {
        if std::mem::size_of::<T>() != self.dtype.size() {
            return Err(crate::Error::new(format!(
                "tensor `{}` is {} and cannot be read as {}",
                self.name,
                self.dtype,
                std::any::type_name::<T>()
            )));
        }
        Ok(match bytemuck::try_cast_slice::<u8, T>(self.data) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(self.data)),
        })
    }

    /// The spec of this view.
    pub fn spec(&self) -> TensorSpec {
        TensorSpec::new(self.name, self.dtype, self.shape)
    }
}

/// An owned tensor, as plugins return them.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Name relative to the module (`qweight`, `weight.absmax`...).
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Little-endian element bytes.
    pub data: Vec<u8>,
}

impl Tensor {
    /// A tensor from plain-old-data elements; the dtype must match `T`'s size.
    pub fn from_slice<T: bytemuck::Pod>(
        name: impl Into<String>,
        dtype: DType,
        shape: impl Into<Vec<usize>>,
        values: &[T],
    ) -> Tensor {
        let shape = shape.into();
        debug_assert_eq!(std::mem::size_of::<T>(), dtype.size());
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        Tensor { name: name.into(), dtype, shape, data: bytemuck::cast_slice(values).to_vec() }
    }

    /// An F32 tensor.
    pub fn f32(name: impl Into<String>, shape: impl Into<Vec<usize>>, values: &[f32]) -> Tensor {
        Tensor::from_slice(name, DType::F32, shape, values)
    }

    /// An F32 tensor stored as `dtype` (F32, F16 or BF16, rounding to nearest even).
    pub fn from_f32_as(
        name: impl Into<String>,
        dtype: DType,
        shape: impl Into<Vec<usize>>,
        values: &[f32],
    ) -> Tensor {
        Tensor { name: name.into(), dtype, shape: shape.into(), data: from_f32(dtype, values) }
    }

    /// A borrowed view of this tensor.
    pub fn view(&self) -> TensorView<'_> {
        TensorView { name: &self.name, dtype: self.dtype, shape: &self.shape, data: &self.data }
    }

    /// The spec of this tensor.
    pub fn spec(&self) -> TensorSpec {
        TensorSpec::new(self.name.clone(), self.dtype, self.shape.clone())
    }
}

/// Converts little-endian elements of `dtype` to F32.
pub fn to_f32(dtype: DType, data: &[u8]) -> Vec<f32> {
    fn conv<const N: usize>(data: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
        data.chunks_exact(N).map(|c| f(c.try_into().unwrap())).collect()
    }
    match dtype {
        DType::F32 => conv(data, f32::from_le_bytes),
        DType::F16 => conv(data, |b| half::f16::from_le_bytes(b).to_f32()),
        DType::BF16 => conv(data, |b| half::bf16::from_le_bytes(b).to_f32()),
        DType::F64 => conv(data, |b| f64::from_le_bytes(b) as f32),
        DType::I8 => data.iter().map(|&b| b as i8 as f32).collect(),
        DType::U8 | DType::BOOL => data.iter().map(|&b| b as f32).collect(),
        DType::I16 => conv(data, |b| i16::from_le_bytes(b) as f32),
        DType::U16 => conv(data, |b| u16::from_le_bytes(b) as f32),
        DType::I32 => conv(data, |b| i32::from_le_bytes(b) as f32),
        DType::U32 => conv(data, |b| u32::from_le_bytes(b) as f32),
        DType::I64 => conv(data, |b| i64::from_le_bytes(b) as f32),
    }
}

/// Converts F32 values to little-endian bytes of a float `dtype` (F32, F16, BF16 or F64),
/// rounding to nearest even. Panics for integer dtypes: those need a quantizer, not a cast.
pub fn from_f32(dtype: DType, values: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(values).to_vec(),
        DType::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        DType::BF16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        DType::F64 => values.iter().flat_map(|&v| (v as f64).to_le_bytes()).collect(),
        other => panic!("from_f32: {other} is not a float dtype"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::parse(d.name()), Some(d));
            assert_eq!(DType::parse(d.torch_name()), Some(d));
        }
        assert_eq!(DType::parse("torch.bfloat16"), Some(DType::BF16));
        assert_eq!(DType::parse("q4"), None);
    }

    #[test]
    fn float_conversions_round_trip_representable_values() {
        let v = [0.0f32, -1.5, 2.0, 61440.0, -0.0078125];
        for d in [DType::F32, DType::F16, DType::BF16, DType::F64] {
            assert_eq!(to_f32(d, &from_f32(d, &v)), v, "{d}");
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values; the even one is 1.0.
        let x = 1.0f32 + 2f32.powi(-8);
        assert_eq!(to_f32(DType::BF16, &from_f32(DType::BF16, &[x])), [1.0]);
    }

    #[test]
    fn variable_length_specs_admit_shorter_1d_tensors_only() {
        let fixed = TensorSpec::new("scales", DType::F16, [4, 2]);
        assert!(fixed.admits(DType::F16, &[4, 2]));
        assert!(!fixed.admits(DType::F16, &[8]) && !fixed.admits(DType::F32, &[4, 2]));
        let state = TensorSpec::variable("quant_state", DType::U8, 200);
        assert!(state.variable_length && state.byte_len() == 200);
        assert!(state.admits(DType::U8, &[181]) && state.admits(DType::U8, &[200]) && state.admits(DType::U8, &[0]));
        assert!(!state.admits(DType::U8, &[201]) && !state.admits(DType::U8, &[10, 1]) && !state.admits(DType::I8, &[5]));
        // Fixed specs keep the 1.1 JSON; variable ones say so.
        assert_eq!(serde_json::to_string(&fixed).unwrap(), r#"{"name":"scales","dtype":"F16","shape":[4,2]}"#);
        let back: TensorSpec = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        assert_eq!(back, state);
    }

    #[test]
    fn view_casts_check_element_size() {
        let t = Tensor::from_slice("q", DType::I32, [2], &[7i32, -1]);
        assert_eq!(&*t.view().cast::<i32>().unwrap(), &[7, -1]);
        assert!(t.view().cast::<u8>().is_err());
        assert_eq!(t.view().to_f32(), vec![7.0, -1.0]);
    }
}
