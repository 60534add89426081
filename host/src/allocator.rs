//! The C allocator's settings for kvant's pattern: tensors and activations of tens of megabytes
//! allocated and freed over and over, from the host and its plugins (which share the C
//! allocator, unlike their Rust state).
//!
//! glibc's defaults serve such blocks from fresh `mmap`s and hand them back on free (or trim
//! the heap top), so each reuse pays page faults and the kernel's zeroing of every page: on
//! the GPTQ run of SmolLM2 that was 2.3 M faults and 8 s of system time. Keeping blocks up to
//! the largest non-mmap size in the heap and not trimming it removes most of them.

/// Applies the settings (glibc only; elsewhere nothing to do). Call once, at start.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads start.
    unsafe {
        // 32 MiB is the largest value glibc accepts on 64-bit systems; setting it also stops
        // glibc from moving the threshold by itself, hence the explicit trim threshold.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
