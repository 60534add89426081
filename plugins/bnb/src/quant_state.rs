//! The `weight.quant_state.bitsandbytes__nf4` / `__fp4` tensor: the non-tensor part of a 4-bit
//! quant state as UTF-8 JSON bytes, written exactly as bitsandbytes serialises it (Python's
//! `json.dumps` of a dict: key order as inserted, `", "` and `": "` separators, `repr` floats).

use kvant_plugin_api::{DType, Error};
use serde_json::Value;

use crate::four_bit::QuantType;

/// The parsed contents of a packed quant state.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantStateMeta {
    /// `nf4` or `fp4`.
    pub quant_type: QuantType,
    /// 4-bit blocksize.
    pub blocksize: usize,
    /// Dtype of the original weight (what dequantization returns).
    pub dtype: DType,
    /// Shape of the original weight, `[out, in]` for a Linear.
    pub shape: Vec<usize>,
    /// Present when the absmax is double-quantized.
    pub nested: Option<NestedMeta>,
}

/// Double-quantization fields of a quant state.
#[derive(Clone, Debug, PartialEq)]
pub struct NestedMeta {
    /// Always 256 in bitsandbytes.
    pub blocksize: usize,
    /// Dtype of the nested quantization input (float32).
    pub dtype: DType,
    /// The mean subtracted from absmax before quantizing it.
    pub offset: f32,
}

impl QuantStateMeta {
    /// Name of the state-dict entry, relative to the weight: `quant_state.bitsandbytes__nf4`.
    pub fn key(&self) -> String {
        format!("quant_state.bitsandbytes__{}", self.quant_type.name())
    }

    /// The JSON bytes bitsandbytes stores.
    pub fn to_bytes(&self) -> Vec<u8> {
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        let mut s = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.quant_type.name(),
            self.blocksize,
            self.dtype.torch_name(),
            shape.join(", ")
        );
        if let Some(n) = &self.nested {
            s += &format!(
                ", \"nested_blocksize\": {}, \"nested_dtype\": \"{}\", \"nested_offset\": {}",
                n.blocksize,
                n.dtype.torch_name(),
                python_float_repr(n.offset as f64)
            );
        }
        s.push('}');
        s.into_bytes()
    }

    /// Parses the JSON bytes of a packed quant state.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| Error::new(format!("quant_state is not JSON: {e}")))?;
        let field = |k: &str| v.get(k).ok_or_else(|| Error::new(format!("quant_state has no \"{k}\"")));
        let uint = |k: &str| {
            field(k)?.as_u64().map(|n| n as usize).ok_or_else(|| Error::new(format!("quant_state \"{k}\" is not an integer")))
        };
        let dtype = |k: &str| {
            let s = field(k)?.as_str().unwrap_or_default();
            DType::parse(s).ok_or_else(|| Error::new(format!("quant_state \"{k}\" is not a dtype: {s:?}")))
        };
        let qt = field("quant_type")?.as_str().unwrap_or_default();
        let quant_type =
            QuantType::parse(qt).ok_or_else(|| Error::new(format!("quant_state quant_type {qt:?} is not nf4 or fp4")))?;
        let shape = field("shape")?
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| Error::new("quant_state shape is not a list of sizes"))?;
        let nested = if v.get("nested_offset").is_some() {
            let offset = field("nested_offset")?.as_f64().ok_or_else(|| Error::new("quant_state nested_offset is not a number"))?;
            Some(NestedMeta { blocksize: uint("nested_blocksize")?, dtype: dtype("nested_dtype")?, offset: offset as f32 })
        } else {
            None
        };
        Ok(QuantStateMeta { quant_type, blocksize: uint("blocksize")?, dtype: dtype("dtype")?, shape, nested })
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip, in positional notation when the
/// decimal exponent is from -4 to 15 and in scientific notation (`1e-05`, `1.5e+16`) otherwise.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    // Rust's `{:e}` gives the same shortest round-trip digits: "-d.ddde-N".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} always has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(|&c| c != '.').collect();
    if x == 0.0 {
        return format!("{sign}0.0");
    }
    // Python's rule is on the position of the decimal point: `0.d1d2... * 10^point`.
    let point = exp + 1;
    if !(-4 < point && point <= 16) {
        let frac = &digits[1..];
        let m = if frac.is_empty() { digits[..1].to_string() } else { format!("{}.{}", &digits[..1], frac) };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{m}e{esign}{:02}", exp.abs());
    }
    let n = digits.len() as i32;
    let body = if point <= 0 {
        format!("0.{}{}", "0".repeat((-point) as usize), digits)
    } else if point >= n {
        format!("{}{}.0", digits, "0".repeat((point - n) as usize))
    } else {
        format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
    };
    format!("{sign}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_like_python() {
        for (x, s) in [
            (2.613006591796875, "2.613006591796875"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (1e-5, "1e-05"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (0.00012, "0.00012"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (123.25, "123.25"),
            (-0.009999999776482582, "-0.009999999776482582"),
            (9.999999350456404e-39, "9.999999350456404e-39"),
        ] {
            assert_eq!(python_float_repr(x), s, "{x:e}");
        }
    }

    #[test]
    fn round_trips_and_matches_bitsandbytes_layout() {
        let meta = QuantStateMeta {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            dtype: DType::BF16,
            shape: vec![16384],
            nested: Some(NestedMeta { blocksize: 256, dtype: DType::F32, offset: 2.613_006_6 }),
        };
        let bytes = meta.to_bytes();
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [16384], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 2.613006591796875}"#
        );
        assert_eq!(QuantStateMeta::from_bytes(&bytes).unwrap(), meta);
        assert_eq!(meta.key(), "quant_state.bitsandbytes__nf4");
        assert!(QuantStateMeta::from_bytes(b"{\"quant_type\": \"int4\"}").is_err());
    }
}
