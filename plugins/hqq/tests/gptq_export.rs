//! The GPTQ export (`export_format = "gptq"`): options, `quantization_config`, and the bits read
//! back by a decoder written here from the format's definition, one bit at a time. (The `gptq`
//! plugin, which reads the checkpoint by its `quant_method`, cannot be linked beside this one:
//! both export the plugin entry symbol. `plugins/gptq/scripts/check-gptqmodel.py` checks it through kvant.)

use kvant_hqq::Hqq;
use kvant_plugin_api::dense::relative_error;
use kvant_plugin_api::{Config, DType, Module, ModuleKind, ModuleTensors, QuantMethod, Tensor, TensorSpec};
use serde_json::{json, Value};

fn config(user: Value) -> Config {
    Config::validate(&Hqq.info().options, user.as_object().unwrap()).unwrap()
}

fn problems(user: Value) -> Vec<String> {
    Hqq.check_config(&config(user)).into_iter().map(|p| p.key).collect()
}

fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut u = move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    };
    (0..n).map(|_| 0.02 * (-2.0 * u().ln()).sqrt() * (std::f32::consts::TAU * u()).cos()).collect()
}

#[test]
fn refuses_what_gptq_cannot_store_naming_each_key() {
    assert!(problems(json!({"export_format": "gptq"})).is_empty());
    let got = problems(json!({"export_format": "gptq", "axis": 0, "nbits": 1, "integer_zero": false, "compute_dtype": "bfloat16"}));
    assert_eq!(got, ["axis", "nbits", "integer_zero", "compute_dtype"]);
    assert_eq!(problems(json!({"checkpoint_format": "gptq"})), ["checkpoint_format"]);
}

#[test]
fn quantization_config_is_gptqmodels_and_says_who_made_it() {
    for (format, v1) in [(None, false), (Some("gptq"), true)] {
        let mut user = json!({"export_format": "gptq", "nbits": 3, "group_size": 32});
        if let Some(f) = format {
            user["checkpoint_format"] = f.into();
        }
        let qc = Hqq.process_model_after_weight_loading(&Default::default(), &config(user)).unwrap();
        assert_eq!(qc["quant_method"], "gptq");
        assert_eq!((qc["bits"].clone(), qc["group_size"].clone()), (json!(3), json!(32)));
        assert_eq!((qc["sym"].clone(), qc["desc_act"].clone()), (json!(false), json!(false)));
        assert_eq!(qc["checkpoint_format"], if v1 { "gptq" } else { "gptq_v2" });
        assert!(qc["meta"]["quantizer"][0].as_str().unwrap().starts_with("kvant-hqq:"));
    }
}

/// Value `k` of the bit stream that runs through `words[i * stride + base]`, `i = 0, 1, ...`,
/// least significant bit first.
fn stream_value(words: &[i32], base: usize, stride: usize, k: usize, bits: usize) -> u32 {
    (0..bits)
        .map(|b| {
            let bit = k * bits + b;
            ((words[base + bit / 32 * stride] as u32 >> (bit % 32)) & 1) << b
        })
        .sum()
}

/// The dense weight of GPTQ tensors, decoded from the layout's definition.
fn decode(t: &[Tensor], out: usize, inp: usize, bits: usize, v1: bool) -> Vec<f32> {
    let get = |n: &str| t.iter().find(|t| t.name == n).unwrap().view();
    let words = |n: &str| -> Vec<i32> { get(n).data.chunks(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect() };
    let (qw, qz) = (words("qweight"), words("qzeros"));
    let (scales, g_idx) = (get("scales").to_f32(), get("g_idx").to_f32());
    let mut w = vec![0f32; out * inp];
    for o in 0..out {
        for i in 0..inp {
            let g = g_idx[i] as usize;
            let code = stream_value(&qw, o, out, i, bits) as f32;
            let zero = (stream_value(&qz, g * out * bits / 32, 1, o, bits) + v1 as u32) as f32;
            w[o * inp + i] = (code - zero) * scales[g * out + o];
        }
    }
    w
}

#[test]
fn the_bits_decode_to_the_weights_hqq_reports() {
    let (out, inp) = (96, 160);
    let w = gaussian(out * inp, 5);
    let bias: Vec<f32> = (0..out).map(|o| o as f32 / 100.0).collect();
    let module = Module {
        name: "model.layers.0.mlp.up_proj".into(),
        kind: ModuleKind::Linear,
        tensors: vec![TensorSpec::new("weight", DType::F32, [out, inp]), TensorSpec::new("bias", DType::F32, [out])],
        not_converted: None,
    };
    for (bits, g, format) in [(4, 64, "gptq_v2"), (4, 64, "gptq"), (3, 32, "gptq"), (8, 128, "gptq_v2")] {
        let c = config(json!({"export_format": "gptq", "nbits": bits, "group_size": g, "checkpoint_format": format}));
        let plan = Hqq.plan_linear(&module, &c).unwrap().unwrap();
        let (wt, bt) = (Tensor::f32("weight", [out, inp], &w), Tensor::f32("bias", [out], &bias));
        let views = [wt.view(), bt.view()];
        let q = Hqq.quantize(&ModuleTensors { plan: &plan, tensors: &views }, None, &c).unwrap();
        let written: Vec<TensorSpec> = q.tensors.iter().map(Tensor::spec).collect();
        assert_eq!(written, plan.tensors, "{bits}-bit {format}: quantize must write exactly the plan");

        let packed: Vec<_> = q.tensors.iter().map(Tensor::view).collect();
        let m = ModuleTensors { plan: &plan, tensors: &packed };
        let ours = Hqq.dequantize(&m, &c).unwrap();
        let err = relative_error(&ours, &w);
        assert!((q.loss.unwrap() - err).abs() < 1e-4, "{bits}-bit {format}: reported loss {:?} vs {err}", q.loss);

        assert_eq!(decode(&q.tensors, out, inp, bits as usize, format == "gptq"), ours, "{bits}-bit {format}");
        assert_eq!(Hqq.linear_shape(&m, &c).unwrap(), (out, inp));
        let x = gaussian(3 * inp, 9);
        let stored_bias = q.tensors.iter().find(|t| t.name == "bias").unwrap().view().to_f32();
        let want = kvant_plugin_api::dense::linear_forward(&x, 3, &ours, (out, inp), Some(&stored_bias));
        assert!(relative_error(&Hqq.forward(&m, &x, 3, &c).unwrap(), &want) < 1e-5, "{bits}-bit {format}: forward");
        let g_idx = q.tensors.iter().find(|t| t.name == "g_idx").unwrap().view().to_f32();
        assert_eq!(g_idx[inp - 1] as usize, (inp - 1) / g, "{bits}-bit g{g}: g_idx (short last group at g 64, 128)");
    }
}
