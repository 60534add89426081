//! The three methods through the kvant contract: the tensors a module gets are the ones
//! bitsandbytes puts in a state dict, and they read back.

use kvant_bnb::plugin::{Bnb4, BnbInt8};
use kvant_plugin_api::{
    Config, DType, Module, ModuleKind, ModulePlan, ModuleTensors, QuantMethod, Summary, Tensor, TensorSpec, TensorView,
};
use safetensors::SafeTensors;
use serde_json::{json, Value};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fixtures.safetensors");

fn config(method: &impl QuantMethod, user: Value) -> Config {
    let cfg = Config::validate(&method.info().options, user.as_object().unwrap()).expect("valid options");
    assert!(method.check_config(&cfg).is_empty(), "{:?}", method.check_config(&cfg));
    cfg
}

fn linear(name: &str, dtype: DType, out: usize, inp: usize, bias: bool) -> Module {
    let mut tensors = vec![TensorSpec::new("weight", dtype, [out, inp])];
    if bias {
        tensors.push(TensorSpec::new("bias", dtype, [out]));
    }
    Module { name: name.into(), kind: ModuleKind::Linear, tensors, not_converted: None }
}

fn views(tensors: &[Tensor]) -> Vec<TensorView<'_>> {
    tensors.iter().map(Tensor::view).collect()
}

/// Runs plan + quantize for the fixture `case`'s input; checks the result against the plan.
fn quantize_case(method: &impl QuantMethod, cfg: &Config, case: &str, out: usize, inp: usize) -> (ModulePlan, Vec<Tensor>) {
    let bytes = std::fs::read(FIXTURES).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let input = st.tensor(&format!("{case}.input")).unwrap();
    let dtype = DType::parse(&format!("{:?}", input.dtype())).unwrap();
    let module = linear("model.layers.0.mlp.up_proj", dtype, out, inp, false);
    let plan = method.plan_linear(&module, cfg).unwrap().expect("converted");
    let w = TensorView { name: "weight", dtype, shape: &[out, inp], data: input.data() };
    let tensors = method.quantize(&ModuleTensors { plan: &plan, tensors: &[w] }, None, cfg).unwrap().tensors;
    assert_eq!(tensors.len(), plan.tensors.len());
    for t in &tensors {
        let spec = plan.tensors.iter().find(|s| s.name == t.name).unwrap_or_else(|| panic!("unplanned {}", t.name));
        assert!(spec.admits(t.dtype, &t.shape), "{}: {} {:?} against {spec:?}", t.name, t.dtype, t.shape);
        assert_eq!(t.data.len(), t.shape.iter().product::<usize>() * t.dtype.size(), "{}", t.name);
        // Only the double-quant quant_state, which holds the offset, is settled by quantize.
        assert_eq!(spec.variable_length, t.name.contains("quant_state") && cfg.bool("bnb_4bit_use_double_quant"), "{}", t.name);
    }
    (plan, tensors)
}

fn fixture(case: &str, item: &str) -> Vec<u8> {
    let bytes = std::fs::read(FIXTURES).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(&format!("{case}.{item}")).unwrap();
    t.data().to_vec()
}

#[test]
fn nf4_state_dict_is_bitsandbytes_and_reads_back() {
    let m = Bnb4::nf4();
    let cfg = config(&m, json!({"bnb_4bit_use_double_quant": true, "bnb_4bit_blocksize": 32, "bnb_4bit_compute_dtype": "bfloat16"}));
    let case = "nf4_bf16_two_nested_blocks";
    let (plan, tensors) = quantize_case(&m, &cfg, case, 40, 260);
    for t in &tensors {
        // bitsandbytes' names are relative to the weight: `weight.absmax` is the fixture's `absmax`
        let want = fixture(case, t.name.strip_prefix("weight.").unwrap_or(&t.name));
        assert_eq!(t.data, want, "{}", t.name);
    }

    let v = views(&tensors);
    let module = ModuleTensors { plan: &plan, tensors: &v };
    assert_eq!(m.linear_shape(&module, &cfg).unwrap(), (40, 260));
    let dense = m.dequantize(&module, &cfg).unwrap();
    let want: Vec<f32> = fixture(case, "dequant")
        .chunks_exact(2)
        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
    assert_eq!(dense, want, "dequantized like bitsandbytes, in BF16");
    let x: Vec<f32> = (0..2 * 260).map(|i| (i as f32 * 0.01).sin()).collect();
    let y = m.forward(&module, &x, 2, &cfg).unwrap();
    let reference = kvant_plugin_api::dense::linear_forward(&x, 2, &dense, (40, 260), None);
    assert!(kvant_plugin_api::dense::relative_error(&y, &reference) < 1e-2);
}

#[test]
fn int8_state_dict_is_bitsandbytes_and_reads_back() {
    let m = BnbInt8;
    let cfg = config(&m, json!({}));
    let case = "int8_bf16";
    let (plan, tensors) = quantize_case(&m, &cfg, case, 5, 33);
    let by_name = |n: &str| tensors.iter().find(|t| t.name == n).unwrap();
    assert_eq!(by_name("weight").data, fixture(case, "weight"));
    assert_eq!(by_name("SCB").data, fixture(case, "SCB"));
    assert_eq!(by_name("weight_format").data, [0]);
    let v = views(&tensors);
    let module = ModuleTensors { plan: &plan, tensors: &v };
    assert_eq!(m.linear_shape(&module, &cfg).unwrap(), (5, 33));
    let dense = m.dequantize(&module, &cfg).unwrap();
    let want: Vec<f32> = fixture(case, "dequant_f32").chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(dense, want);
}

#[test]
fn quantization_config_is_what_transformers_writes() {
    // BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
    // bnb_4bit_compute_dtype=torch.bfloat16).to_dict(), transformers 5.23
    let nf4 = Bnb4::nf4();
    let cfg = config(&nf4, json!({"bnb_4bit_use_double_quant": true, "bnb_4bit_compute_dtype": "bfloat16"}));
    let qc = nf4.process_model_after_weight_loading(&Summary::default(), &cfg).unwrap();
    assert_eq!(
        serde_json::to_string(&qc).unwrap(),
        r#"{"quant_method":"bitsandbytes","_load_in_8bit":false,"_load_in_4bit":true,"llm_int8_threshold":6.0,"llm_int8_skip_modules":null,"llm_int8_enable_fp32_cpu_offload":false,"llm_int8_has_fp16_weight":false,"bnb_4bit_quant_type":"nf4","bnb_4bit_use_double_quant":true,"bnb_4bit_compute_dtype":"bfloat16","bnb_4bit_quant_storage":"uint8","load_in_4bit":true,"load_in_8bit":false}"#
    );
    // BitsAndBytesConfig(load_in_8bit=True).to_dict()
    let int8 = BnbInt8;
    let qc = int8.process_model_after_weight_loading(&Summary::default(), &config(&int8, json!({}))).unwrap();
    assert_eq!(
        serde_json::to_string(&qc).unwrap(),
        r#"{"quant_method":"bitsandbytes","_load_in_8bit":true,"_load_in_4bit":false,"llm_int8_threshold":6.0,"llm_int8_skip_modules":null,"llm_int8_enable_fp32_cpu_offload":false,"llm_int8_has_fp16_weight":false,"bnb_4bit_quant_type":"fp4","bnb_4bit_use_double_quant":false,"bnb_4bit_compute_dtype":"float32","bnb_4bit_quant_storage":"uint8","load_in_4bit":false,"load_in_8bit":true}"#
    );
    // the checkpoint's config selects the method
    let info = nf4.info();
    assert_eq!(info.answers_to[0]["load_in_4bit"], true);
    assert_eq!(info.answers_to[0]["bnb_4bit_quant_type"], "nf4");
    assert!(info.flags.is_trainable && info.flags.is_serializable && !info.flags.requires_calibration);
}

#[test]
fn options_are_checked_and_skip_modules_honoured() {
    let nf4 = Bnb4::nf4();
    let cfg = Config::validate(&nf4.info().options, json!({"bnb_4bit_quant_type": "fp4"}).as_object().unwrap()).unwrap();
    assert_eq!(nf4.check_config(&cfg)[0].key, "bnb_4bit_quant_type");
    let cfg = Config::validate(&nf4.info().options, json!({"llm_int8_has_fp16_weight": true}).as_object().unwrap()).unwrap();
    assert_eq!(nf4.check_config(&cfg)[0].key, "llm_int8_has_fp16_weight");
    assert!(Config::validate(&nf4.info().options, json!({"bnb_4bit_blocksize": 48}).as_object().unwrap()).is_err());

    let cfg = config(&nf4, json!({"llm_int8_skip_modules": ["mlp"]}));
    assert!(nf4.plan_linear(&linear("model.layers.0.mlp.up_proj", DType::BF16, 8, 64, true), &cfg).unwrap().is_none());
    let plan = nf4.plan_linear(&linear("model.layers.0.self_attn.q_proj", DType::BF16, 8, 64, true), &cfg).unwrap().unwrap();
    let names: Vec<&str> = plan.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4", "bias"]);

    // quant_storage reinterprets the packed bytes: 8x64 weights are 256 bytes, 64 F32 values
    let cfg = config(&nf4, json!({"bnb_4bit_quant_storage": "float32"}));
    let plan = nf4.plan_linear(&linear("q", DType::F32, 8, 64, false), &cfg).unwrap().unwrap();
    assert_eq!(plan.tensors[0], TensorSpec::new("weight", DType::F32, [64, 1]));
    assert!(nf4.plan_linear(&linear("q", DType::F32, 3, 3, false), &cfg).is_err());
}

/// `n` roughly standard normal values (Box-Muller on a fixed 64-bit LCG stream).
fn gaussian(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 11) + 1) as f64 / (1u64 << 53) as f64
    };
    (0..n).map(|_| ((-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos()) as f32).collect()
}

#[test]
fn int8_forward_tolerance_covers_the_rounding_of_inputs_and_no_more() {
    // LLM.int8 also rounds each input row to int8: for Gaussian rows the error is about
    // (row absmax / 127) / sqrt(12) of the rms, 0.5-0.9 % for these widths. The declared forward
    // tolerance must hold it, and the default (summation order only) must not.
    let m = BnbInt8;
    let cfg = config(&m, json!({}));
    let declared = f64::from(m.info().forward_tolerance);
    for (i, (out, inp)) in [(64, 64), (96, 576), (128, 2048)].into_iter().enumerate() {
        let w = gaussian(i as u64, out * inp);
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let plan = m.plan_linear(&linear("model.layers.0.mlp.down_proj", DType::F32, out, inp, false), &cfg).unwrap().unwrap();
        let weight = TensorView { name: "weight", dtype: DType::F32, shape: &[out, inp], data: &bytes };
        let q = m.quantize(&ModuleTensors { plan: &plan, tensors: &[weight] }, None, &cfg).unwrap();
        let v = views(&q.tensors);
        let module = ModuleTensors { plan: &plan, tensors: &v };
        let rows = 32;
        let x = gaussian(100 + i as u64, rows * inp);
        let y = m.forward(&module, &x, rows, &cfg).unwrap();
        let dense = m.dequantize(&module, &cfg).unwrap();
        let reference = kvant_plugin_api::dense::linear_forward(&x, rows, &dense, (out, inp), None);
        let error = kvant_plugin_api::dense::relative_error(&y, &reference);
        assert!(error > f64::from(kvant_plugin_api::DEFAULT_FORWARD_TOLERANCE) && error < 0.012, "{out}x{inp}: {error}");
        assert!(error < declared / 2.5, "{out}x{inp}: {error} against the declared {declared}");
    }
}
