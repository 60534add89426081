//! Writes the inputs and kvant's results that `scripts/reference-check.py` compares with a
//! PyTorch GPTQ. Does nothing unless `KVANT_GPTQ_FIXTURE` names a folder:
//! `KVANT_GPTQ_FIXTURE=/tmp/gptq-fixture cargo test -p kvant-gptq --test reference_fixture`.

use std::path::Path;

use kvant_gptq::{gptq, GptqParams, HessianObserver};
use kvant_plugin_api::Observer;
use serde_json::json;

mod common;
use common::{activations, normal};

fn write<T: Copy>(dir: &Path, name: &str, values: &[T]) {
    // SAFETY: plain numeric values viewed as their little-endian bytes (x86/ARM hosts).
    let bytes = unsafe { std::slice::from_raw_parts(values.as_ptr() as *const u8, std::mem::size_of_val(values)) };
    std::fs::write(dir.join(name), bytes).unwrap();
}

#[test]
fn write_reference_fixture() {
    let Ok(dir) = std::env::var("KVANT_GPTQ_FIXTURE") else { return };
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir).unwrap();
    // SmolLM2's width: group 128 leaves a short last group of 64.
    let (out, inp, rows) = (192, 576, 2048);
    let x = activations(rows, inp, 31);
    let w = normal(out * inp, 32);
    let mut obs = HessianObserver::new("fixture", inp);
    obs.observe(&x, rows).unwrap();
    let h = obs.hessian();
    write(dir, "x.f32", &x);
    write(dir, "w.f32", &w);
    write(dir, "h.f64", &h);

    let base = GptqParams {
        bits: 4,
        group_size: 128,
        sym: true,
        desc_act: false,
        static_groups: false,
        damp_percent: 0.05,
        damp_auto_increment: 0.01,
        mse: 0.0,
        zero_at_least_one: false,
        refit_scales: false,
    };
    let cases = [
        ("b4_g128_sym", base),
        ("b4_g128_asym_actorder", GptqParams { sym: false, desc_act: true, ..base }),
        ("b4_g128_sym_actorder_static", GptqParams { desc_act: true, static_groups: true, ..base }),
        ("b3_perrow_asym", GptqParams { bits: 3, group_size: -1, sym: false, ..base }),
        ("b2_g64_asym", GptqParams { bits: 2, group_size: 64, sym: false, ..base }),
        ("b4_g128_sym_mse", GptqParams { mse: 2.4, ..base }),
    ];
    let mut manifest = Vec::new();
    for (name, p) in cases {
        let q = gptq(name, &w, (out, inp), h.clone(), obs.rows(), &p).unwrap();
        write(dir, &format!("{name}.codes.u8"), &q.codes);
        write(dir, &format!("{name}.scales.f32"), &q.scales);
        write(dir, &format!("{name}.zeros.u8"), &q.zeros);
        write(dir, &format!("{name}.g_idx.i32"), &q.g_idx);
        manifest.push(json!({
            "name": name, "bits": p.bits, "group_size": p.group_size, "sym": p.sym, "desc_act": p.desc_act,
            "static_groups": p.static_groups, "damp_percent": p.damp_percent, "mse": p.mse,
            "loss": q.loss, "damp_used": q.damp_percent,
        }));
    }
    let manifest = json!({"out": out, "inp": inp, "rows": rows, "nsamples": obs.rows(), "cases": manifest});
    std::fs::write(dir.join("manifest.json"), serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
}
