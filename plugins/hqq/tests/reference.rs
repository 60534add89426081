//! kvant's HQQ against the hqq 0.2.8 library, on fixtures made by `scripts/make-fixtures.py`.

use std::collections::BTreeMap;

use kvant_hqq::bitpack::Packing;
use kvant_hqq::format::{Layout, Packed};
use kvant_hqq::solver::SolverParams;
use kvant_hqq::Hqq;
use kvant_plugin_api::dense::relative_error;
use kvant_plugin_api::{Config, DType, Module, ModuleKind, ModuleTensors, QuantMethod, Tensor, TensorSpec, TensorView};
use safetensors::SafeTensors;
use serde_json::{json, Value};

const WEIGHTS: [&str; 4] = ["q_proj", "down_proj", "v_proj", "outliers"];
const CASES: [(u32, usize, u32); 6] = [(4, 64, 0), (4, 64, 1), (3, 64, 0), (3, 64, 1), (2, 16, 0), (2, 16, 1)];

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn dtype(d: safetensors::Dtype) -> DType {
    DType::parse(&format!("{d:?}")).unwrap()
}

/// A fixture tensor, copied out under `name`.
fn load(st: &SafeTensors<'_>, key: &str, name: &str) -> Tensor {
    let t = st.tensor(key).unwrap_or_else(|_| panic!("fixture has no {key}"));
    Tensor { name: name.into(), dtype: dtype(t.dtype()), shape: t.shape().to_vec(), data: t.data().to_vec() }
}

fn config(user: Value) -> Config {
    Config::validate(&Hqq.info().options, user.as_object().unwrap()).unwrap()
}

#[test]
fn packing_is_byte_exact_with_hqq() {
    let bytes = fixture("reference.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (nbits, g, axis) in CASES {
        let key = format!("v_proj.{nbits}_{g}_{axis}");
        let w = load(&st, "v_proj", "w");
        let l = Layout::new(w.shape[0], w.shape[1], nbits, g, axis).unwrap();
        let codes = load(&st, &format!("{key}.codes"), "codes");
        let w_q = load(&st, &format!("{key}.W_q"), "W_q");
        assert_eq!(codes.shape, [l.code_rows(), l.code_cols()], "{key}");
        let spec = l.w_q_spec();
        assert_eq!((w_q.dtype, &w_q.shape), (spec.dtype, &spec.shape), "{key}");
        let p = Packing::new(nbits).unwrap();
        assert!(p.pack(&codes.data, l.code_rows(), l.code_cols()) == w_q.data, "{key}: packed bytes differ");
        assert!(p.unpack(&w_q.data, l.code_rows(), l.code_cols()) == codes.data, "{key}: unpacked codes differ");
    }
}

#[test]
fn error_within_one_percent_of_hqq_and_never_worse_than_min_max() {
    let bytes = fixture("reference.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let errors: BTreeMap<String, BTreeMap<String, f64>> = serde_json::from_slice(&fixture("reference.json")).unwrap();
    let (mut report, mut failures) = (String::new(), Vec::new());
    for name in WEIGHTS {
        let wv = load(&st, name, "weight");
        let w = wv.view().to_f32();
        let (out, inp) = (wv.shape[0], wv.shape[1]);
        for (nbits, g, axis) in CASES {
            let key = format!("{name}.{nbits}_{g}_{axis}");
            let l = Layout::new(out, inp, nbits, g, axis).unwrap();
            let params = SolverParams { nbits, round_zero: nbits == 4, ..Default::default() };
            let (w_q, scale, zero, sq) = l.quantize(&w, &params);
            let ours = Packed { layout: l, w_q: &w_q, scale, zero }.dequantize();
            let err = relative_error(&ours, &w);
            let norm: f64 = w.iter().map(|&v| (v as f64).powi(2)).sum();
            assert!(((sq / norm).sqrt() - err).abs() < 1e-4, "{key}: reported error");

            // hqq's own tensors, dequantized by kvant, give hqq's error back.
            let (hq, hs, hz) = (load(&st, &format!("{key}.W_q"), "W_q"), load(&st, &format!("{key}.scale"), "scale"), load(&st, &format!("{key}.zero"), "zero"));
            let theirs = Packed { layout: l, w_q: &hq.data, scale: hs.view().to_f32(), zero: hz.view().to_f32() }.dequantize();
            let (hqq, min_max) = (errors[&key]["hqq"], errors[&key]["min_max"]);
            assert!((relative_error(&theirs, &w) - hqq).abs() < 1e-5 * hqq.max(1.0), "{key}: hqq's tensors read back wrong");

            report += &format!("{key:18} kvant {err:.5}  hqq {hqq:.5}  min-max {min_max:.5}\n");
            if err > hqq * 1.01 || err > min_max * (1.0 + 1e-6) {
                failures.push(key);
            }
        }
    }
    println!("{report}");
    assert!(failures.is_empty(), "kvant worse than hqq by over 1%, or than min-max: {failures:?}");
}

#[test]
fn writes_hqqlinear_state_dict_layout() {
    let bytes = fixture("hqqlinear.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let refs = fixture("reference.safetensors");
    let rst = SafeTensors::deserialize(&refs).unwrap();
    let weight = load(&rst, "v_proj", "weight");
    let bias = load(&st, "bias", "bias");
    let (out, inp) = (weight.shape[0], weight.shape[1]);
    let module = Module {
        name: "model.layers.0.self_attn.v_proj".into(),
        kind: ModuleKind::Linear,
        tensors: vec![TensorSpec::new("weight", DType::F32, [out, inp]), TensorSpec::new("bias", DType::F32, [out])],
        not_converted: None,
    };
    let c = config(json!({"nbits": 4, "group_size": 64, "axis": 1, "compute_dtype": "float16"}));
    let plan = Hqq.plan_linear(&module, &c).unwrap().unwrap();
    let bias32 = Tensor::f32("bias", [out], &bias.view().to_f32());
    let views = [weight.view(), bias32.view()];
    let q = Hqq.quantize(&ModuleTensors { plan: &plan, tensors: &views }, None, &c).unwrap();

    let planned: Vec<TensorSpec> = plan.tensors.clone();
    let written: Vec<TensorSpec> = q.tensors.iter().map(Tensor::spec).collect();
    assert_eq!(planned, written, "quantize must write exactly the plan");
    let mut names: Vec<&str> = written.iter().map(|t| t.name.as_str()).collect();
    names.sort();
    let mut want: Vec<String> = st.names().into_iter().cloned().collect();
    want.sort();
    assert_eq!(names, want);
    for t in &q.tensors {
        let r = load(&st, &t.name, &t.name);
        assert_eq!((t.dtype, &t.shape), (r.dtype, &r.shape), "{}", t.name);
        match t.name.as_str() {
            // The zero points differ where kvant's solver departs from hqq's (see solver.rs).
            "W_q" | "zero" => {}
            _ => assert!(t.data == r.data, "{}: bytes differ from hqq's", t.name),
        }
    }
    // Read back both ways: kvant's reader on hqq's file, and the shape.
    let hqq_tensors: Vec<Tensor> = st.names().into_iter().map(|n| load(&st, n, n)).collect();
    let hqq_views: Vec<TensorView> = hqq_tensors.iter().map(Tensor::view).collect();
    let empty = kvant_plugin_api::ModulePlan { name: "v_proj".into(), shape: (0, 0), tensors: vec![], attrs: Value::Null };
    let m = ModuleTensors { plan: &empty, tensors: &hqq_views };
    assert_eq!(Hqq.linear_shape(&m, &c).unwrap(), (out, inp));
    let plan2 = kvant_plugin_api::ModulePlan { shape: (out, inp), ..empty.clone() };
    let m = ModuleTensors { plan: &plan2, tensors: &hqq_views };
    let deq = Hqq.dequantize(&m, &c).unwrap();
    assert!(relative_error(&deq, &weight.view().to_f32()) < 0.1);
    // forward on the packed form agrees with dense arithmetic on the dequantized weight.
    let x: Vec<f32> = (0..3 * inp).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    let y = Hqq.forward(&m, &x, 3, &c).unwrap();
    let want = kvant_plugin_api::dense::linear_forward(&x, 3, &deq, (out, inp), Some(&bias.view().to_f32()));
    assert!(relative_error(&y, &want) < 1e-5);
}

#[test]
fn quantization_config_is_transformers_hqqconfig() {
    let c = config(json!({"nbits": 3, "group_size": 64}));
    let qc = Hqq.process_model_after_weight_loading(&Default::default(), &c).unwrap();
    let want = json!({
        "quant_config": {
            "offload_meta": false,
            "scale_quant_params": null,
            "weight_quant_params": {"axis": 1, "channel_wise": true, "group_size": 64, "nbits": 3,
                                    "optimize": true, "round_zero": false, "view_as_float": false},
            "zero_quant_params": null
        },
        "quant_method": "hqq",
        "skip_modules": ["lm_head"]
    });
    assert_eq!(Value::Object(qc.clone()), want);
    let back = Hqq.config_from_checkpoint(&qc).unwrap();
    // round_zero matching hqq's rule for the bit width reads back as unset.
    assert_eq!(Value::Object(back), json!({"axis": 1, "group_size": 64, "nbits": 3, "optimize": true}));
}

/// kvant's `rtn` plugin, asymmetric: min and max taken with 0, F16 scale, integer zero point.
fn rtn(w: &[f32], nbits: u32, g: usize) -> Vec<f32> {
    let maxq = ((1u32 << nbits) - 1) as f32;
    w.chunks(g)
        .flat_map(|c| {
            let (lo, hi) = c.iter().fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let scale = Tensor::from_f32_as("s", DType::F16, [1], &[if hi == lo { 1.0 } else { (hi - lo) / maxq }]).view().to_f32()[0];
            let zero = (-lo / scale).round().clamp(0.0, maxq);
            c.iter().map(move |&v| (((v / scale).round() + zero).clamp(0.0, maxq) - zero) * scale)
        })
        .collect()
}

#[test]
fn never_worse_than_rtn() {
    let bytes = fixture("reference.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for name in WEIGHTS {
        let wv = load(&st, name, "weight");
        let w = wv.view().to_f32();
        let (out, inp) = (wv.shape[0], wv.shape[1]);
        for (nbits, g, _) in CASES.iter().filter(|c| c.2 == 1) {
            let rtn_err = relative_error(&rtn(&w, *nbits, *g), &w);
            for integer_zero in [false, true] {
                let l = Layout::new(out, inp, *nbits, *g, 1).unwrap();
                let params = SolverParams { nbits: *nbits, round_zero: *nbits == 4, integer_zero, ..Default::default() };
                let (w_q, scale, zero, _) = l.quantize(&w, &params);
                let err = relative_error(&Packed { layout: l, w_q: &w_q, scale, zero }.dequantize(), &w);
                // RTN's F16 scale moves its error by a few 1e-5 either way.
                assert!(err <= rtn_err * 1.001, "{name} {nbits}-bit g{g} integer_zero {integer_zero}: {err} > RTN {rtn_err}");
            }
        }
    }
}
