//! Plugins that misbehave on one module.
//!
//! `--module-timeout`: a plugin's `quantize` call that does not return in time stops the run.
//! A call into a plugin cannot be cancelled safely (it may hold locks, its own threads, half-built
//! state), so the host does not try: the call runs on a thread of its own with owned copies of its
//! inputs, and when the deadline passes the run ends with an error while that thread is left
//! behind, to die with the process. The partial output stays for `--resume`.
//!
//! `--skip-failed-modules`: a module whose `quantize` errors, panics, or returns NaN or tensors
//! that break its plan is kept dense instead (written from the input weights), and the report
//! says why. The output layout is fixed before the first weight is written, so the run starts
//! over with the module added to the `--skip` list; the result is what running with that
//! `--skip` from the start gives. Without the flag, the run stops at the first such module.
//! A timeout is never skipped (the call may still be running), nor is a failure during
//! calibration-based quantization, which stops the run.

use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{anyhow, Result};

use crate::lifecycle::{QuantizeReport, QuantizeRequest};
use kvant_plugin_api::ffi::{LentQuantized, MethodClient};
use kvant_plugin_api::{Config, ModulePlan, Tensor, TensorView};

/// `method.quantize` on one module without calibration, given up on after `timeout`; the
/// result stays in the plugin's memory. Without a timeout, the call is direct and nothing is
/// copied.
pub fn quantize(
    method: &Arc<MethodClient>,
    plan: &ModulePlan,
    views: &[TensorView<'_>],
    config: &Config,
    timeout: Option<Duration>,
) -> Result<LentQuantized> {
    let name = &method.info().name;
    let failed = |e| anyhow!("method `{name}` failed on module `{}`: {e}", plan.name);
    let Some(timeout) = timeout else {
        return method.quantize_lent(plan, views, None, config).map_err(failed);
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
            let _ = tx.send(method_.quantize_lent(&plan_, &views, None, &config_));
        })
        .map_err(|e| anyhow!("cannot start a thread for module `{}`: {e}", plan.name))?;
    match rx.recv_timeout(timeout) {
        Ok(result) => result.map_err(failed),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(anyhow!(TimedOut(format!(
            "method `{name}` did not finish module `{}` within {} s (--module-timeout); the run stops, because a \
             plugin call cannot be cancelled safely (the partial output is kept for --resume)",
            plan.name,
            timeout.as_secs_f64()
        )))),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(anyhow!("method `{name}` crashed on module `{}`", plan.name)),
    }
}

/// The error of a call past `--module-timeout`.
#[derive(Debug)]
struct TimedOut(String);

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TimedOut {}

/// A module the method failed on, in a way `--skip-failed-modules` may keep dense.
#[derive(Debug)]
struct ModuleFailed {
    module: String,
    reason: String,
}

impl std::fmt::Display for ModuleFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.reason)
    }
}

impl std::error::Error for ModuleFailed {}

/// Marks the failure of `module` as skippable, unless it is a timeout.
pub fn module_failure(module: &str, e: anyhow::Error) -> anyhow::Error {
    if e.is::<TimedOut>() {
        return e;
    }
    anyhow!(ModuleFailed { module: module.to_string(), reason: format!("{e:#}") })
}

/// Runs `quantize`, and with `req.skip_failed_modules` runs it again with each failed module
/// kept dense, until it succeeds; the report's `not_converted` gives each one's failure.
pub fn skipping_failed_modules(
    req: &QuantizeRequest,
    mut quantize: impl FnMut(&QuantizeRequest) -> Result<QuantizeReport>,
) -> Result<QuantizeReport> {
    let mut req = req.clone();
    let mut failed: Vec<(String, String)> = Vec::new();
    loop {
        match quantize(&req) {
            Ok(mut report) => {
                for (module, why) in &mut report.not_converted {
                    if let Some((_, reason)) = failed.iter().find(|(m, _)| m == module) {
                        *why = format!("quantize failed: {reason}");
                    }
                }
                return Ok(report);
            }
            Err(e) if req.skip_failed_modules => {
                let Some(f) = e.downcast_ref::<ModuleFailed>() else { return Err(e) };
                log::warn!("keeping `{}` dense (--skip-failed-modules): {}; starting over without it", f.module, f.reason);
                req.not_convert.push(format!("re:^{}$", regex::escape(&f.module)));
                // The partial folder of the failed attempt has another layout: not reusable.
                req.resume = true;
                failed.push((f.module.clone(), f.reason.clone()));
            }
            Err(e) => return Err(e),
        }
    }
}
