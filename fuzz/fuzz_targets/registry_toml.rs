//! Any text as `registry.toml`: parsed and its paths checked, never loaded (a fuzzer must not
//! open whatever library a generated path names).
#![no_main]

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let file = common::scratch().join("registry").join("registry.toml");
    let base = file.parent().unwrap();
    if let Ok(plan) = kvant::registry::RegistryPlan::parse(&file, text) {
        // A relative library path that was accepted never climbs out of the registry's folder.
        for path in plan.library_paths() {
            if let Ok(rest) = path.strip_prefix(base) {
                assert!(
                    !rest.components().any(|c| matches!(c, std::path::Component::ParentDir)),
                    "accepted a library path escaping the registry folder: {}",
                    path.display()
                );
            }
        }
    }
});
