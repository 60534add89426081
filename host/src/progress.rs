//! Progress display shared by the host and its plugins' callbacks.

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

static CURRENT: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// A bar over `total` units (modules, windows...), drawn on stderr when it is a terminal and
/// `visible`; plugins' progress inside one unit shows as its message.
pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    /// Starts a bar; only one is current at a time.
    pub fn new(total: u64, prefix: &str, visible: bool) -> Bar {
        let bar = if visible { ProgressBar::new(total) } else { ProgressBar::hidden() };
        bar.set_style(
            ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {elapsed_precise} {wide_msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(prefix.to_string());
        *CURRENT.lock().unwrap() = Some(bar.clone());
        Bar { bar }
    }

    /// Advances by one unit and names the next.
    pub fn step(&self, message: &str) {
        self.bar.inc(1);
        self.bar.set_message(message.to_string());
    }

    /// Moves to `done` units.
    pub fn set_position(&self, done: u64) {
        self.bar.set_position(done);
    }


    /// Prints a line above the bar.
    pub fn println(&self, line: &str) {
        if self.bar.is_hidden() {
            log::info!("{line}");
        } else {
            self.bar.println(line);
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
        *CURRENT.lock().unwrap() = None;
    }
}

/// Progress inside the current unit, as plugins report it.
pub(crate) fn inner(done: u64, total: u64, message: &str) {
    if let Some(bar) = CURRENT.lock().unwrap().as_ref() {
        bar.set_message(format!("{message} {done}/{total}"));
    }
}
