//! Byte-for-byte comparison with what bitsandbytes produced for the same inputs
//! (fixtures made by `scripts/make-fixtures.py`; see `tests/fixtures/cases.json` for the versions).

use kvant_bnb::double_quant::{self, NESTED_BLOCKSIZE};
use kvant_bnb::forward::{self, Weight4};
use kvant_bnb::four_bit::{self, QuantType};
use kvant_bnb::input::{encode, Floats};
use kvant_bnb::int8;
use kvant_bnb::plugin::Bnb4;
use kvant_bnb::quant_state::{python_float_repr, NestedMeta, QuantStateMeta};
use kvant_plugin_api::{Config, DType, Module, ModuleKind, ModuleTensors, QuantMethod, TensorSpec, TensorView};
use safetensors::SafeTensors;
use serde_json::Value;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

struct Fixtures {
    bytes: Vec<u8>,
    cases: Vec<Value>,
}

impl Fixtures {
    fn load() -> Self {
        let bytes = std::fs::read(format!("{DIR}/fixtures.safetensors")).expect("fixtures.safetensors");
        let meta: Value = serde_json::from_slice(&std::fs::read(format!("{DIR}/cases.json")).unwrap()).unwrap();
        Fixtures { bytes, cases: meta["cases"].as_array().unwrap().clone() }
    }

    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.cases.iter().filter(|c| c["kind"] == kind).collect()
    }
}

/// Tensor `<case>.<item>`: dtype name and bytes.
fn tensor<'a>(st: &'a SafeTensors<'a>, case: &str, item: &str) -> (DType, &'a [u8]) {
    let t = st.tensor(&format!("{case}.{item}")).unwrap_or_else(|e| panic!("{case}.{item}: {e}"));
    let dtype = DType::parse(&format!("{:?}", t.dtype())).unwrap();
    (dtype, t.data())
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()
}

#[test]
fn four_bit_matches_bitsandbytes_byte_for_byte() {
    let fx = Fixtures::load();
    let st = SafeTensors::deserialize(&fx.bytes).unwrap();
    let cases = fx.of_kind("4bit");
    assert!(cases.len() >= 30);
    let mut offsets_equal = 0;
    let mut offsets_dq = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let qt = QuantType::parse(case["quant_type"].as_str().unwrap()).unwrap();
        let bs = case["blocksize"].as_u64().unwrap() as usize;
        let shape = usizes(&case["shape"]);
        let dq = case["double_quant"].as_bool().unwrap();
        let (dtype, input) = tensor(&st, name, "input");
        let n: usize = shape.iter().product();

        let q = four_bit::quantize(Floats::new(dtype, input).unwrap(), bs, qt).unwrap();
        assert_eq!(q.packed, tensor(&st, name, "weight").1, "{name}: packed weight");
        assert_eq!(f32_bytes(&qt.codes()), tensor(&st, name, "quant_map").1, "{name}: quant_map");

        let (nested_meta, absmax_f32) = if dq {
            offsets_dq += 1;
            // The only value torch's summation order can touch is the offset; take bitsandbytes' to
            // check everything downstream of it, then check ours separately.
            let bnb_offset = f32::from_bits(case["offset_bits"].as_u64().unwrap() as u32);
            let ours = double_quant::mean(&q.absmax);
            let ulps = (ours.to_bits() as i64 - bnb_offset.to_bits() as i64).abs();
            assert!(ulps <= 1, "{name}: offset {ours} vs bitsandbytes {bnb_offset}");
            offsets_equal += (ulps == 0) as usize;

            let nested = double_quant::compress_with_offset(&q.absmax, bnb_offset);
            assert_eq!(nested.codes, tensor(&st, name, "absmax").1, "{name}: absmax codes");
            assert_eq!(f32_bytes(&nested.nested_absmax), tensor(&st, name, "nested_absmax").1, "{name}: nested_absmax");
            assert_eq!(
                f32_bytes(double_quant::dynamic_map()),
                tensor(&st, name, "nested_quant_map").1,
                "{name}: nested_quant_map"
            );
            if ulps == 0 {
                assert_eq!(double_quant::compress(&q.absmax), nested, "{name}: compress with our own offset");
            }
            let back = double_quant::decompress(&nested);
            assert_eq!(f32_bytes(&back), tensor(&st, name, "absmax_dequant").1, "{name}: decompressed absmax");
            let meta = NestedMeta { blocksize: NESTED_BLOCKSIZE, dtype: DType::F32, offset: bnb_offset };
            (Some(meta), back)
        } else {
            assert_eq!(f32_bytes(&q.absmax), tensor(&st, name, "absmax").1, "{name}: absmax");
            (None, q.absmax.clone())
        };

        let meta = QuantStateMeta { quant_type: qt, blocksize: bs, dtype, shape: shape.clone(), nested: nested_meta };
        let bnb_offset = meta.nested.as_ref().map(|n| n.offset);
        through_the_plugin(&st, name, qt, bs, dq, dtype, &shape, input, bnb_offset);
        let (_, state) = tensor(&st, name, &format!("quant_state.bitsandbytes__{}", qt.name()));
        assert_eq!(
            std::str::from_utf8(&meta.to_bytes()).unwrap(),
            std::str::from_utf8(state).unwrap(),
            "{name}: quant_state JSON"
        );
        assert_eq!(QuantStateMeta::from_bytes(state).unwrap(), meta, "{name}: quant_state parse");

        let mut deq = four_bit::dequantize(&q.packed, &absmax_f32, n, bs, qt).unwrap();
        // bitsandbytes dequantizes an odd last dimension, and blocks of 2048+ on AVX-512 CPUs like this
        // one, in PyTorch rather than C++; that path writes FP4's zero as +0.0 where C++ writes -0.0.
        if shape[shape.len() - 1] % 2 == 1 || bs >= 2048 {
            deq.iter_mut().filter(|v| **v == 0.0).for_each(|v| *v = 0.0);
        }
        assert_eq!(encode(&deq, dtype).unwrap(), tensor(&st, name, "dequant").1, "{name}: dequantized {dtype}");
    }
    eprintln!("double-quant offset: {offsets_equal} of {offsets_dq} bit-identical to torch's mean, the rest 1 ulp away");
}

/// The whole module as the `bnb-4bit` method writes it (plan, then quantize), every tensor
/// against bitsandbytes' bytes, the quant_state JSON included.
#[allow(clippy::too_many_arguments)]
fn through_the_plugin(
    st: &SafeTensors<'_>,
    name: &str,
    qt: QuantType,
    bs: usize,
    dq: bool,
    dtype: DType,
    shape: &[usize],
    input: &[u8],
    bnb_offset: Option<f32>,
) {
    let method = if qt == QuantType::Nf4 { Bnb4::nf4() } else { Bnb4::fp4() };
    let user = serde_json::json!({
        "bnb_4bit_quant_type": qt.name(), "bnb_4bit_blocksize": bs, "bnb_4bit_use_double_quant": dq,
    });
    let config = Config::validate(&method.info().options, user.as_object().unwrap()).unwrap();
    let (out, inp) = (shape[0], shape[1]);
    let module = Module {
        name: "model.layers.0.mlp.up_proj".into(),
        kind: ModuleKind::Linear,
        tensors: vec![TensorSpec::new("weight", dtype, [out, inp])],
        not_converted: None,
    };
    let plan = method.plan_linear(&module, &config).unwrap().expect("converted");
    let weight = TensorView { name: "weight", dtype, shape: &[out, inp], data: input };
    let q = method.quantize(&ModuleTensors { plan: &plan, tensors: &[weight] }, None, &config).unwrap();
    assert_eq!(q.tensors.len(), plan.tensors.len(), "{name}");
    // Where torch's summation order gives bitsandbytes' double-quant offset another last bit (see
    // `four_bit_matches_bitsandbytes_byte_for_byte`), only what depends on the offset may differ.
    let ours_offset = double_quant::mean(&four_bit::quantize(Floats::new(dtype, input).unwrap(), bs, qt).unwrap().absmax);
    let same_offset = bnb_offset.is_none_or(|o| o == ours_offset);
    let key = format!("weight.quant_state.bitsandbytes__{}", qt.name());
    for t in &q.tensors {
        let spec = plan.tensors.iter().find(|s| s.name == t.name).unwrap();
        assert!(spec.admits(t.dtype, &t.shape), "{name}: `{}` is {} {:?}, planned {spec:?}", t.name, t.dtype, t.shape);
        let want = tensor(st, name, t.name.strip_prefix("weight.").unwrap_or(&t.name)).1;
        if t.name != key {
            let from_offset = matches!(t.name.as_str(), "weight.absmax" | "weight.nested_absmax") && bnb_offset.is_some();
            if same_offset || !from_offset {
                assert_eq!(t.data, want, "{name}: `{}` through the plugin", t.name);
            }
            continue;
        }
        let ours = std::str::from_utf8(&t.data).unwrap();
        let theirs = std::str::from_utf8(want).unwrap();
        let Some(bnb_offset) = bnb_offset else {
            assert_eq!(ours, theirs, "{name}: quant_state");
            continue;
        };
        // Double quant: the JSON ends with the offset, the rest is bitsandbytes' bytes exactly.
        if same_offset {
            assert_eq!(ours, theirs, "{name}: quant_state, byte for byte");
        } else {
            let with_theirs = ours.replace(&python_float_repr(ours_offset as f64), &python_float_repr(bnb_offset as f64));
            assert_eq!(with_theirs, theirs, "{name}: quant_state apart from the offset's last bit");
        }
    }
    if same_offset {
        // Read back through the plugin: bitsandbytes' dequantized weights in the original dtype
        // (zeros compared without their sign, see `four_bit_matches_bitsandbytes_byte_for_byte`).
        let views: Vec<TensorView<'_>> = q.tensors.iter().map(|t| t.view()).collect();
        let mut back = method.dequantize(&ModuleTensors { plan: &plan, tensors: &views }, &config).unwrap();
        let mut want = Floats::new(dtype, tensor(st, name, "dequant").1).unwrap().to_vec();
        back.iter_mut().chain(want.iter_mut()).filter(|v| **v == 0.0).for_each(|v| *v = 0.0);
        assert_eq!(encode(&back, dtype).unwrap(), encode(&want, dtype).unwrap(), "{name}: dequantized through the plugin");
    }
}

#[test]
fn fixtures_cover_the_awkward_cases() {
    let fx = Fixtures::load();
    let st = SafeTensors::deserialize(&fx.bytes).unwrap();
    let mut odd = false;
    let mut partial = false;
    let mut nested_blocks = false;
    let mut dtypes = std::collections::HashSet::new();
    for case in fx.of_kind("4bit") {
        let n: usize = usizes(&case["shape"]).iter().product();
        let bs = case["blocksize"].as_u64().unwrap() as usize;
        odd |= n % 2 == 1;
        partial |= !n.is_multiple_of(bs);
        nested_blocks |= case["double_quant"] == true && n.div_ceil(bs) > NESTED_BLOCKSIZE;
        dtypes.insert(case["dtype"].as_str().unwrap().to_string());
    }
    assert!(odd && partial && nested_blocks && dtypes.len() == 3);
    // the tie cases really put values on midpoints: 0.5 * (code[7] + code[8]) is in the NF4 tie input
    let (_, ties) = tensor(&st, "nf4_f32_ties", "input");
    let mid = 0.5 * (QuantType::Nf4.codes()[7] + QuantType::Nf4.codes()[8]);
    assert!(f32s(ties).contains(&mid));
}

#[test]
fn blockwise_8bit_matches_bitsandbytes() {
    let fx = Fixtures::load();
    let st = SafeTensors::deserialize(&fx.bytes).unwrap();
    for case in fx.of_kind("blockwise8") {
        let name = case["name"].as_str().unwrap();
        let bs = case["blocksize"].as_u64().unwrap() as usize;
        let x = f32s(tensor(&st, name, "input").1);
        let (q, absmax) = double_quant::quantize_blockwise(&x, bs);
        assert_eq!(f32_bytes(double_quant::dynamic_map()), tensor(&st, name, "code").1, "{name}: dynamic map");
        assert_eq!(f32_bytes(&absmax), tensor(&st, name, "absmax").1, "{name}: absmax");
        let want = tensor(&st, name, "q").1;
        let bad: Vec<_> = (0..q.len()).filter(|&i| q[i] != want[i]).map(|i| (x[i], q[i], want[i])).take(5).collect();
        assert!(bad.is_empty(), "{name}: (value, ours, bitsandbytes) {bad:?}");
    }
}

#[test]
fn int8_matches_bitsandbytes() {
    let fx = Fixtures::load();
    let st = SafeTensors::deserialize(&fx.bytes).unwrap();
    for case in fx.of_kind("int8") {
        let name = case["name"].as_str().unwrap();
        let shape = usizes(&case["shape"]);
        let (dtype, input) = tensor(&st, name, "input");
        let w = int8::quantize(Floats::new(dtype, input).unwrap(), shape[0], shape[1]).unwrap();
        let cb: Vec<u8> = w.cb.iter().map(|&v| v as u8).collect();
        assert_eq!(cb, tensor(&st, name, "weight").1, "{name}: CB");
        assert_eq!(f32_bytes(&w.scb), tensor(&st, name, "SCB").1, "{name}: SCB");
        assert_eq!(f32_bytes(&int8::dequantize(&w)), tensor(&st, name, "dequant_f32").1, "{name}: dequantized");

        // The forward is float arithmetic in another order (and bitsandbytes rounds to the input
        // dtype on the way): compare within that dtype's precision.
        let (xdt, xb) = tensor(&st, name, "x");
        let x = Floats::new(xdt, xb).unwrap().to_vec();
        let (ydt, yb) = tensor(&st, name, "y");
        let want = Floats::new(ydt, yb).unwrap().to_vec();
        let batch = x.len() / shape[1];
        let threshold = case["threshold"].as_f64().unwrap() as f32;
        let got = int8::forward(&w, &x, batch, threshold, None).unwrap();
        let tol = if xdt == DType::BF16 { 2e-2 } else { 2e-3 };
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
            assert!((g - e).abs() <= tol * scale, "{name}: y[{i}] {g} vs bitsandbytes {e}");
        }
    }
}

#[test]
fn forward_on_packed_weights_matches_dequantized_fixture() {
    let fx = Fixtures::load();
    let st = SafeTensors::deserialize(&fx.bytes).unwrap();
    let case = "nf4_bf16_two_nested_blocks";
    let (_, packed) = tensor(&st, case, "weight");
    let absmax = f32s(tensor(&st, case, "absmax_dequant").1);
    let (dt, dense) = tensor(&st, case, "dequant");
    let dense = Floats::new(dt, dense).unwrap().to_vec();
    let (rows, cols) = (40, 260);
    let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
    let w = Weight4 { packed, absmax: &absmax, rows, cols, blocksize: 32, quant_type: QuantType::Nf4, dtype: DType::BF16 };
    let y = forward::forward(&w, &x, 1, None).unwrap();
    for r in 0..rows {
        let want: f32 = (0..cols).map(|k| dense[r * cols + k] * x[k]).sum();
        // the same BF16 weights as bitsandbytes' dequantization; only the summation order differs
        assert!((y[r] - want).abs() < 1e-5 * (1.0 + want.abs()), "row {r}: {} vs {want}", y[r]);
    }
}
