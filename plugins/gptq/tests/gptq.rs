//! GPTQ against round-to-nearest, act-order, degenerate Hessians, and the plugin hooks end to end.

use kvant_gptq::{gptq, quantization_config, Gptq, GptqParams, HessianObserver};
use kvant_plugin_api::{
    dense::linear_forward, Config, DType, Module, ModuleKind, ModuleTensors, Observer, QuantMethod, Summary, Tensor,
    TensorSpec, TensorView,
};
use serde_json::{json, Map, Value};

mod common;
use common::{activations, normal};

fn params(bits: u32, group_size: i64, sym: bool, desc_act: bool) -> GptqParams {
    GptqParams {
        bits,
        group_size,
        sym,
        desc_act,
        static_groups: false,
        damp_percent: 0.05,
        damp_auto_increment: 0.01,
        mse: 0.0,
        zero_at_least_one: false,
        refit_scales: false,
    }
}

fn hessian(x: &[f32], rows: usize, inp: usize) -> (Vec<f64>, u64) {
    let mut obs = HessianObserver::new("test", inp);
    obs.observe(x, rows).unwrap();
    (obs.hessian(), obs.rows())
}

fn identity(n: usize) -> Vec<f64> {
    (0..n * n).map(|k| if k % (n + 1) == 0 { 1.0 } else { 0.0 }).collect()
}

/// `||X W^T - X Q^T||` relative to `||X W^T||`.
fn output_error(x: &[f32], rows: usize, w: &[f32], q: &[f32], shape: (usize, usize)) -> f64 {
    let a = linear_forward(x, rows, w, shape, None);
    let b = linear_forward(x, rows, q, shape, None);
    kvant_plugin_api::dense::relative_error(&b, &a)
}

#[test]
fn gptq_beats_round_to_nearest_on_the_calibration_inputs() {
    let (out, inp, rows) = (96, 320, 1024);
    let x = activations(rows, inp, 11);
    let w = normal(out * inp, 12);
    let (h, n) = hessian(&x, rows, inp);
    for (bits, group, sym, desc_act) in [(4, 128, true, false), (4, 64, false, false), (3, 128, false, true), (2, -1, false, false), (8, 32, true, true)] {
        let p = params(bits, group, sym, desc_act);
        let rtn = gptq("rtn", &w, (out, inp), identity(inp), 1, &params(bits, group, sym, false)).unwrap();
        let q = gptq("gptq", &w, (out, inp), h.clone(), n, &p).unwrap();
        let e_rtn = output_error(&x, rows, &w, &rtn.dequantize(out, inp), (out, inp));
        let e_gptq = output_error(&x, rows, &w, &q.dequantize(out, inp), (out, inp));
        eprintln!("bits {bits} group {group} sym {sym} act-order {desc_act}: RTN {e_rtn:.4}, GPTQ {e_gptq:.4}, loss {:.4}", q.loss);
        assert!(e_gptq < 0.8 * e_rtn, "bits {bits} group {group}: GPTQ {e_gptq} vs RTN {e_rtn}");
        assert!(q.loss.is_finite() && q.loss > 0.0);
    }
}

#[test]
fn bf16_hessian_products_cost_almost_no_accuracy() {
    let (out, inp, rows) = (128, 576, 2048);
    let x = activations(rows, inp, 41);
    let w = normal(out * inp, 42);
    let mut f32_obs = HessianObserver::new("m", inp);
    let mut bf16_obs = HessianObserver::new("m", inp).with_bf16(true);
    for batch in x.chunks(512 * inp) {
        f32_obs.observe(batch, batch.len() / inp).unwrap();
        bf16_obs.observe(batch, batch.len() / inp).unwrap();
    }
    let p = params(4, 128, true, false);
    let a = gptq("m", &w, (out, inp), f32_obs.hessian(), f32_obs.rows(), &p).unwrap();
    let b = gptq("m", &w, (out, inp), bf16_obs.hessian(), bf16_obs.rows(), &p).unwrap();
    let e_f32 = output_error(&x, rows, &w, &a.dequantize(out, inp), (out, inp));
    let e_bf16 = output_error(&x, rows, &w, &b.dequantize(out, inp), (out, inp));
    eprintln!("Hessian products F32: {e_f32:.5}, BF16 (used: {}): {e_bf16:.5}", bf16_obs.uses_bf16());
    assert!(e_bf16 < 1.01 * e_f32, "{e_bf16} vs {e_f32}");
}

#[test]
fn refitting_scales_lowers_the_output_error() {
    let (out, inp, rows) = (96, 320, 1024);
    let x = activations(rows, inp, 51);
    let w = normal(out * inp, 52);
    let (h, n) = hessian(&x, rows, inp);
    for (bits, group, sym, desc_act) in [(4, 128, true, false), (3, 64, false, true), (2, -1, true, false)] {
        let p = params(bits, group, sym, desc_act);
        let plain = gptq("m", &w, (out, inp), h.clone(), n, &p).unwrap();
        let refit = gptq("m", &w, (out, inp), h.clone(), n, &GptqParams { refit_scales: true, ..p }).unwrap();
        assert_eq!((&plain.codes, &plain.g_idx), (&refit.codes, &refit.g_idx));
        let e_plain = output_error(&x, rows, &w, &plain.dequantize(out, inp), (out, inp));
        let e_refit = output_error(&x, rows, &w, &refit.dequantize(out, inp), (out, inp));
        eprintln!("bits {bits} group {group} sym {sym} act-order {desc_act}: GPTQ {e_plain:.5}, with refit scales {e_refit:.5}");
        assert!(e_refit < e_plain);
    }
}

#[test]
fn act_order_g_idx_follows_the_processing_order() {
    let (out, inp, rows) = (32, 96, 256);
    let mut x = activations(rows, inp, 3);
    // Make the diagonal strictly ordered: input i gets a distinct, shuffled magnitude.
    let rank: Vec<usize> = (0..inp).map(|i| (i * 61) % inp).collect();
    for r in 0..rows {
        for i in 0..inp {
            x[r * inp + i] *= 1.0 + rank[i] as f32;
        }
    }
    let (h, n) = hessian(&x, rows, inp);
    let w = normal(out * inp, 4);
    let q = gptq("m", &w, (out, inp), h.clone(), n, &params(4, 32, true, true)).unwrap();
    let mut order: Vec<usize> = (0..inp).collect();
    order.sort_by(|&a, &b| h[b * inp + b].total_cmp(&h[a * inp + a]));
    for (pos, &col) in order.iter().enumerate() {
        assert_eq!(q.g_idx[col], (pos / 32) as i32, "column {col} at position {pos}");
    }
    // Static groups keep consecutive groups in the original order.
    let mut p = params(4, 32, true, true);
    p.static_groups = true;
    let s = gptq("m", &w, (out, inp), h, n, &p).unwrap();
    assert!(s.g_idx.iter().enumerate().all(|(i, &g)| g == (i / 32) as i32));
}

#[test]
fn short_last_group_is_handled() {
    // 576 inputs with group 128: four full groups and one of 64.
    let (out, inp, rows) = (32, 576, 600);
    let x = activations(rows, inp, 5);
    let w = normal(out * inp, 6);
    let (h, n) = hessian(&x, rows, inp);
    for desc_act in [false, true] {
        let q = gptq("m", &w, (out, inp), h.clone(), n, &params(4, 128, true, desc_act)).unwrap();
        assert_eq!(q.scales.len(), 5 * out);
        let mut counts = [0; 5];
        q.g_idx.iter().for_each(|&g| counts[g as usize] += 1);
        assert_eq!(counts, [128, 128, 128, 128, 64]);
        assert!(q.dequantize(out, inp).iter().all(|v| v.is_finite()));
    }
}

#[test]
fn dead_inputs_are_zeroed_without_nan() {
    let (out, inp, rows) = (32, 64, 200);
    let mut x = activations(rows, inp, 7);
    for r in 0..rows {
        for i in [0, 5, 63] {
            x[r * inp + i] = 0.0;
        }
    }
    let (h, n) = hessian(&x, rows, inp);
    let w = normal(out * inp, 8);
    for desc_act in [false, true] {
        let q = gptq("m", &w, (out, inp), h.clone(), n, &params(4, 32, false, desc_act)).unwrap();
        let back = q.dequantize(out, inp);
        assert!(back.iter().all(|v| v.is_finite()) && q.loss.is_finite());
        for o in 0..out {
            for i in [0, 5, 63] {
                assert_eq!(back[o * inp + i], 0.0, "dead input {i} of row {o}");
            }
        }
    }
}

#[test]
fn non_positive_definite_hessian_raises_damping_instead_of_nan() {
    let (out, inp) = (32, 64);
    // Identity minus a strong rank-one term: one eigenvalue is -0.5 while the mean diagonal
    // stays near 1, so damp 0.05 fails and the dampening must grow.
    let v: Vec<f64> = (0..inp).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 } / (inp as f64).sqrt()).collect();
    let h: Vec<f64> = (0..inp * inp).map(|k| if k % (inp + 1) == 0 { 1.0 } else { 0.0 } - 1.5 * v[k / inp] * v[k % inp]).collect();
    let w = normal(out * inp, 9);
    let q = gptq("layers.3.mlp.down_proj", &w, (out, inp), h.clone(), 100, &params(4, 32, true, false)).unwrap();
    assert!(q.damp_percent > 0.5 && q.damp_percent < 1.0, "damp {}", q.damp_percent);
    assert!(q.dequantize(out, inp).iter().all(|v| v.is_finite()) && q.loss.is_finite());
    // Without auto-increment it is an error naming the module, not NaN.
    let mut p = params(4, 32, true, false);
    p.damp_auto_increment = 0.0;
    let e = gptq("layers.3.mlp.down_proj", &w, (out, inp), h, 100, &p).unwrap_err();
    assert!(e.0.contains("layers.3.mlp.down_proj") && e.0.contains("positive definite"), "{e}");
}

#[test]
fn mse_clipping_search_never_increases_the_group_error() {
    let (out, inp, rows) = (64, 256, 512);
    let x = activations(rows, inp, 13);
    let w = normal(out * inp, 14);
    let (h, n) = hessian(&x, rows, inp);
    let plain = gptq("m", &w, (out, inp), h.clone(), n, &params(3, 128, true, false)).unwrap();
    let mut p = params(3, 128, true, false);
    p.mse = 2.4;
    let searched = gptq("m", &w, (out, inp), h, n, &p).unwrap();
    let e_plain = output_error(&x, rows, &w, &plain.dequantize(out, inp), (out, inp));
    let e_mse = output_error(&x, rows, &w, &searched.dequantize(out, inp), (out, inp));
    eprintln!("3-bit g128 sym: plain {e_plain:.4}, mse 2.4 {e_mse:.4}");
    assert!(e_mse < e_plain);
}

fn config(method: &Gptq, user: Value) -> Config {
    let info = method.info();
    let c = Config::validate(&info.options, user.as_object().unwrap()).unwrap();
    assert!(method.check_config(&c).is_empty());
    c
}

fn module(out: usize, inp: usize, bias: bool) -> Module {
    let mut tensors = vec![TensorSpec::new("weight", DType::BF16, [out, inp])];
    if bias {
        tensors.push(TensorSpec::new("bias", DType::BF16, [out]));
    }
    Module { name: "model.layers.0.mlp.up_proj".into(), kind: ModuleKind::Linear, tensors, not_converted: None }
}

/// Plan, observe, quantize, then read the packed tensors back as a pre-quantized checkpoint.
#[test]
fn hooks_round_trip_every_width_and_both_formats() {
    let method = Gptq;
    let (out, inp, rows) = (64, 576, 300);
    let x = activations(rows, inp, 21);
    let w = normal(out * inp, 22);
    let bias = normal(out, 23);
    for (bits, format, sym, desc_act) in
        [(4, "gptq", true, false), (3, "gptq", false, true), (2, "gptq_v2", false, false), (8, "gptq_v2", true, true), (4, "gptq", false, true)]
    {
        let c = config(&method, json!({"bits": bits, "checkpoint_format": format, "sym": sym, "desc_act": desc_act}));
        let plan = method.plan_linear(&module(out, inp, true), &c).unwrap().unwrap();
        let mut obs = method.new_observer(&plan, &c).unwrap();
        obs.observe(&x[..100 * inp], 100).unwrap();
        obs.observe(&x[100 * inp..], rows - 100).unwrap();
        let wt = Tensor::from_f32_as("weight", DType::BF16, [out, inp], &w);
        let bt = Tensor::from_f32_as("bias", DType::BF16, [out], &bias);
        let views = [wt.view(), bt.view()];
        let q = method.quantize(&ModuleTensors { plan: &plan, tensors: &views }, Some(&obs), &c).unwrap();
        let specs: Vec<TensorSpec> = q.tensors.iter().map(Tensor::spec).collect();
        assert_eq!(specs, plan.tensors, "bits {bits}");
        assert!(q.loss.unwrap().is_finite());

        // Read back through the checkpoint's own quantization_config.
        let qc = method.process_model_after_weight_loading(&Summary::default(), &c).unwrap();
        let read = method.config_from_checkpoint(&qc).unwrap();
        let c2 = Config::validate(&method.info().options, &read).unwrap();
        assert_eq!(c2, c);
        let unknown = kvant_plugin_api::ModulePlan { name: plan.name.clone(), shape: (0, 0), tensors: vec![], attrs: Value::Null };
        let packed: Vec<TensorView<'_>> = q.tensors.iter().map(Tensor::view).collect();
        let m = ModuleTensors { plan: &unknown, tensors: &packed };
        assert_eq!(method.linear_shape(&m, &c2).unwrap(), (out, inp));
        let back = method.dequantize(&m, &c2).unwrap();
        let wq = wt.view().to_f32();
        let err = output_error(&x, rows, &wq, &back, (out, inp));
        let limit = [0.0, 0.0, 0.5, 0.3, 0.15, 0.0, 0.0, 0.0, 0.01][bits as usize];
        assert!(err < limit, "bits {bits}: output error {err}");
        // Forward on the packed layout, few rows and many, against dequantize + matmul.
        let b16: Vec<f32> = bt.view().to_f32().iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        for r in [3, 40] {
            let y = method.forward(&m, &x[..r * inp], r, &c2).unwrap();
            let want = linear_forward(&x[..r * inp], r, &back, (out, inp), Some(&b16));
            assert!(kvant_plugin_api::dense::relative_error(&y, &want) < 1e-5, "bits {bits} rows {r}");
        }
    }
}

#[test]
fn v1_symmetric_qzeros_hold_seven_and_config_matches_gptqmodel() {
    let method = Gptq;
    let c = config(&method, json!({}));
    let (out, inp) = (32, 64);
    let plan = method.plan_linear(&module(out, inp, false), &c).unwrap().unwrap();
    let mut obs = method.new_observer(&plan, &c).unwrap();
    obs.observe(&activations(128, inp, 1), 128).unwrap();
    let wt = Tensor::f32("weight", [out, inp], &normal(out * inp, 2));
    let views = [wt.view()];
    let q = method.quantize(&ModuleTensors { plan: &plan, tensors: &views }, Some(&obs), &c).unwrap();
    let qzeros = q.tensors.iter().find(|t| t.name == "qzeros").unwrap();
    assert_eq!(qzeros.shape, [1, 4]);
    assert!(qzeros.view().cast::<i32>().unwrap().iter().all(|&v| v == 0x7777_7777));

    let qc = quantization_config(&c);
    let want = json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false, "sym": true,
                      "damp_percent": 0.05, "static_groups": false, "true_sequential": true, "checkpoint_format": "gptq"});
    for (k, v) in want.as_object().unwrap() {
        assert_eq!(qc.get(k), Some(v), "{k}");
    }
    assert_eq!(qc["meta"]["damp_percent"], json!(0.05));
}

#[test]
fn checkpoint_configs_of_other_tools_are_understood() {
    let method = Gptq;
    // A GPTQModel config with the format under `format` and damping under `meta`.
    let qc: Map<String, Value> = serde_json::from_value(json!({
        "bits": 3, "group_size": 64, "desc_act": true, "sym": false, "lm_head": false, "quant_method": "gptq",
        "format": "gptq_v2", "pack_dtype": "int32",
        "meta": {"quantizer": ["gptqmodel:4.0.0"], "damp_percent": 0.1, "static_groups": false, "mse": null}
    }))
    .unwrap();
    let options = method.config_from_checkpoint(&qc).unwrap();
    let c = Config::validate(&method.info().options, &options).unwrap();
    assert_eq!((c.int("bits"), c.int("group_size"), c.bool("sym")), (3, 64, false));
    assert_eq!((c.str("checkpoint_format"), c.float("damp_percent")), ("gptq_v2", 0.1));
    let bad: Map<String, Value> = serde_json::from_value(json!({"quant_method": "gptq", "checkpoint_format": "marlin"})).unwrap();
    assert!(method.config_from_checkpoint(&bad).is_err());
}

#[test]
fn widths_that_do_not_fill_words_stay_dense() {
    let method = Gptq;
    let c = config(&method, json!({}));
    assert!(method.plan_linear(&module(33, 64, false), &c).unwrap().is_none());
    assert!(method.plan_linear(&module(64, 70, false), &c).unwrap().is_none());
}

/// As `kvant plugin check` runs it: Gaussian weights and only 64 Gaussian calibration rows
/// (fewer than the inputs for 576), default options; the weight error stays within tolerance.
#[test]
fn weight_error_stays_within_the_declared_tolerance_with_little_calibration() {
    let method = Gptq;
    let c = config(&method, json!({}));
    for (out, inp) in [(64, 64), (96, 576)] {
        let plan = method.plan_linear(&module(out, inp, false), &c).unwrap().unwrap();
        let mut obs = method.new_observer(&plan, &c).unwrap();
        for batch in 0..4 {
            obs.observe(&normal(16 * inp, 100 + batch), 16).unwrap();
        }
        let wt = Tensor::f32("weight", [out, inp], &normal(out * inp, 7));
        let views = [wt.view()];
        let q = method.quantize(&ModuleTensors { plan: &plan, tensors: &views }, Some(&obs), &c).unwrap();
        let packed: Vec<TensorView<'_>> = q.tensors.iter().map(Tensor::view).collect();
        let back = method.dequantize(&ModuleTensors { plan: &plan, tensors: &packed }, &c).unwrap();
        let err = kvant_plugin_api::dense::relative_error(&back, &wt.view().to_f32());
        eprintln!("{out}x{inp}: relative weight error {err:.4}");
        assert!(err < method.info().tolerance as f64, "{out}x{inp}: {err}");
    }
}

/// Members sharing an observer (q/k/v) are quantized in one group call, with one factorization
/// of their Hessian: the results equal one `quantize` call per member, and members that
/// cannot share the observer are refused by name.
#[test]
fn a_group_equals_its_members_one_by_one() {
    let method = Gptq;
    let c = config(&method, json!({"desc_act": true}));
    let inp = 128;
    let x = activations(400, inp, 31);
    let shapes = [(64usize, inp), (32, inp), (32, inp)];
    let plans: Vec<_> = shapes.iter().map(|&(out, inp)| method.plan_linear(&module(out, inp, false), &c).unwrap().unwrap()).collect();
    let mut obs = method.new_observer(&plans[0], &c).unwrap();
    obs.observe(&x, 400).unwrap();
    let weights: Vec<Tensor> = shapes.iter().enumerate().map(|(k, &(out, inp))| Tensor::f32("weight", [out, inp], &normal(out * inp, 40 + k as u64))).collect();
    let views: Vec<[TensorView<'_>; 1]> = weights.iter().map(|w| [w.view()]).collect();
    let members: Vec<ModuleTensors<'_>> = plans.iter().zip(&views).map(|(plan, v)| ModuleTensors { plan, tensors: v }).collect();
    let grouped = method.quantize_group(&members, &[Some(&obs); 3], &c).unwrap();
    for (m, g) in members.iter().zip(&grouped) {
        let alone = method.quantize(m, Some(&obs), &c).unwrap();
        assert_eq!(alone.tensors, g.tensors);
        assert_eq!(alone.loss, g.loss);
    }

    let wide = method.plan_linear(&module(32, 2 * inp, false), &c).unwrap().unwrap();
    let w = Tensor::f32("weight", [32, 2 * inp], &normal(64 * inp, 50));
    let v = [w.view()];
    let mixed = [ModuleTensors { plan: &plans[0], tensors: &views[0] }, ModuleTensors { plan: &wide, tensors: &v }];
    let err = method.quantize_group(&mixed, &[Some(&obs); 2], &c).unwrap_err();
    assert!(err.0.contains("up_proj") && err.0.contains("256 inputs"), "{}", err.0);
}
