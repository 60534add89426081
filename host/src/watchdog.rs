//! `--module-timeout`: a plugin's `quantize` call that does not return in time stops the run.
//!
//! A call into a plugin cannot be cancelled safely (it may hold locks, its own threads, half-built
//! state), so the host does not try: the call runs on a thread of its own with owned copies of its
//! inputs, and when the deadline passes the run ends with an error while that thread is left
//! behind, to die with the process. The partial output stays for `--resume`.

use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{anyhow, Result};
use kvant_plugin_api::ffi::MethodClient;
use kvant_plugin_api::{Config, ModulePlan, Quantized, Tensor, TensorView};

/// `method.quantize` on one module without calibration, given up on after `timeout`.
/// Without a timeout, the call is direct and nothing is copied.
pub fn quantize(
    method: &Arc<MethodClient>,
    plan: &ModulePlan,
    views: &[TensorView<'_>],
    config: &Config,
    timeout: Option<Duration>,
) -> Result<Quantized> {
    let name = &method.info().name;
    let failed = |e| anyhow!("method `{name}` failed on module `{}`: {e}", plan.name);
    let Some(timeout) = timeout else {
        return method.quantize(plan, views, None, config).map_err(failed);
    };
    // The thread may outlive this call (and the checkpoint's memory map): it owns what it reads.
    let owned: Vec<Tensor> = views
        .iter()
        .map(|v| Tensor { name: v.name.into(), dtype: v.dtype, shape: v.shape.to_vec(), data: v.data.to_vec() })
        .collect();
    let (method_, plan_, config_) = (Arc::clone(method), plan.clone(), config.clone());
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("quantize {}", plan.name))
        .spawn(move || {
            let views: Vec<TensorView<'_>> = owned.iter().map(Tensor::view).collect();
            let _ = tx.send(method_.quantize(&plan_, &views, None, &config_));
        })
        .map_err(|e| anyhow!("cannot start a thread for module `{}`: {e}", plan.name))?;
    match rx.recv_timeout(timeout) {
        Ok(result) => result.map_err(failed),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(anyhow!(
            "method `{name}` did not finish module `{}` within {} s (--module-timeout); the run stops, because a \
             plugin call cannot be cancelled safely (the partial output is kept for --resume)",
            plan.name,
            timeout.as_secs_f64()
        )),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(anyhow!("method `{name}` crashed on module `{}`", plan.name)),
    }
}
