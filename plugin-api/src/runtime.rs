//! What a plugin borrows from its host: the thread budget, the logger and the progress display.
//!
//! A plugin library carries its own copies of `rayon`'s global pool and of `log`'s logger, so
//! the host's settings do not reach it by themselves. At load the host hands over callbacks;
//! here they become a rayon pool of the host's size, in which every hook runs, and a `log`
//! logger that forwards records to the host.

use std::sync::OnceLock;

use abi_stable::std_types::RStr;

use crate::ffi::HostCallbacksRef;
use crate::Error;

static HOST: OnceLock<HostCallbacksRef> = OnceLock::new();
static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();

struct HostLogger;

fn level_code(level: log::Level) -> u8 {
    level as usize as u8
}

impl log::Log for HostLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        HOST.get().is_some_and(|h| level_code(metadata.level()) <= h.max_log_level())
    }

    fn log(&self, record: &log::Record<'_>) {
        if let Some(host) = HOST.get().filter(|_| self.enabled(record.metadata())) {
            let message = record.args().to_string();
            (host.log())(level_code(record.level()), RStr::from_str(record.target()), RStr::from_str(&message));
        }
    }

    fn flush(&self) {}
}

pub(crate) fn install_host(host: HostCallbacksRef) -> Result<(), Error> {
    if HOST.set(host).is_err() {
        // Loaded twice in one process (a statically linked plugin): the first host stays.
        return Ok(());
    }
    let threads = (host.threads() as usize).max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("kvant-plugin-{i}"))
        .build()
        .map_err(|e| Error::new(format!("cannot start {threads} worker threads: {e}")))?;
    let _ = POOL.set(pool);
    // Fails only when linked into the host itself, whose logger then already receives records.
    if log::set_logger(&HostLogger).is_ok() {
        log::set_max_level(match host.max_log_level() {
            0 => log::LevelFilter::Off,
            1 => log::LevelFilter::Error,
            2 => log::LevelFilter::Warn,
            3 => log::LevelFilter::Info,
            4 => log::LevelFilter::Debug,
            _ => log::LevelFilter::Trace,
        });
    }
    Ok(())
}

/// Runs `f` in the pool sized by the host (or inline, before the host called `init`).
pub(crate) fn in_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    match POOL.get() {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

/// Reports progress inside a long hook (e.g. columns of a GPTQ solve): `done` of `total`
/// units, with a short message. Cheap; call it as often as is useful.
pub fn progress(done: u64, total: u64, message: &str) {
    if let Some(host) = HOST.get() {
        (host.progress())(done, total, RStr::from_str(message));
    }
}

/// The number of threads the host granted this plugin.
pub fn threads() -> usize {
    POOL.get().map_or_else(rayon::current_num_threads, |p| p.current_num_threads())
}
