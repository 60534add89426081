//! Finding and loading plugins: `registry.toml` entries and the drop-in plugins folder.
//!
//! ```toml
//! # Paths are relative to this file. A library path without an extension gets the platform's
//! # prefix and suffix: "target/release/kvant_rtn" is libkvant_rtn.so on Linux.
//! plugins_dir = "plugins.d"          # drop-in folder: every .so/.dylib/.dll in it is loaded
//!
//! [methods.rtn]
//! library = "target/release/kvant_rtn"
//! sha256 = "..."                     # optional: checked before the library is opened
//! enabled = true                     # optional
//! ```
//!
//! A library that is not a kvant plugin, or speaks an incompatible contract, is skipped with a
//! warning and listed as broken. Libraries are never unloaded (abi_stable's rule).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use abi_stable::library::{lib_header_from_path, LibraryError};
use abi_stable::std_types::RStr;
use anyhow::{bail, Context, Result};
use kvant_plugin_api::ffi::{methods_of, HostCallbacks, HostCallbacksRef, MethodClient, PluginModRef};
use kvant_plugin_api::{CONTRACT_VERSION, OLDEST_LOADABLE_CONTRACT};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::requirements;

/// Where a method was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Named in `registry.toml`.
    Registry(PathBuf),
    /// Found in the drop-in plugins folder.
    DropIn(PathBuf),
}

impl Origin {
    /// The library file.
    pub fn library(&self) -> &Path {
        match self {
            Origin::Registry(p) | Origin::DropIn(p) => p,
        }
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Registry(p) => write!(f, "registry: {}", p.display()),
            Origin::DropIn(p) => write!(f, "drop-in: {}", p.display()),
        }
    }
}

/// A loaded, usable method.
pub struct Method {
    /// The method itself (shared with the quantized layers that run on it).
    pub client: Arc<MethodClient>,
    /// Where it came from.
    pub origin: Origin,
}

/// A library that could not be used, and why.
#[derive(Clone, Debug)]
pub struct Broken {
    /// The library file.
    pub path: PathBuf,
    /// What is wrong, for the user.
    pub reason: String,
}

/// Every method the host can use, by name.
#[derive(Default)]
pub struct Registry {
    methods: BTreeMap<String, Method>,
    broken: Vec<Broken>,
    disabled: Vec<(String, PathBuf)>,
}

/// Where to look for plugins.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// A `registry.toml`, if any.
    pub registry_file: Option<PathBuf>,
    /// The drop-in folder; `None` uses the registry's `plugins_dir`.
    pub plugins_dir: Option<PathBuf>,
    /// Threads lent to every plugin.
    pub threads: usize,
    /// Load libraries that other users could have replaced (group- or world-writable).
    pub allow_insecure: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    plugins_dir: Option<PathBuf>,
    #[serde(default)]
    methods: BTreeMap<String, RegistryEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryEntry {
    library: PathBuf,
    sha256: Option<String>,
    #[serde(default = "enabled_default")]
    enabled: bool,
}

fn enabled_default() -> bool {
    true
}

/// File extensions of shared libraries on this platform's neighbours too: a folder shared
/// between machines may hold all three; only loadable ones load.
const LIBRARY_EXTENSIONS: &[&str] = &["so", "dylib", "dll"];

fn library_path(base: &Path, library: &Path) -> PathBuf {
    let path = base.join(library);
    if path.extension().is_some() {
        return path;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!("{}{name}{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX))
}

/// What a `registry.toml` asks for, before any library is opened.
pub struct RegistryPlan {
    /// The drop-in folder it names, resolved against the file's folder.
    pub plugins_dir: Option<PathBuf>,
    /// Libraries to load, each with the entries that name it (a library may provide several).
    libraries: BTreeMap<PathBuf, BTreeMap<String, RegistryEntry>>,
    /// Entries refused before loading, and why.
    pub refused: Vec<Broken>,
}

impl RegistryPlan {
    /// Parses the text of the registry `file` (used to resolve relative paths and in messages).
    pub fn parse(file: &Path, text: &str) -> Result<RegistryPlan> {
        let parsed: RegistryFile =
            toml::from_str(text).with_context(|| format!("{} is not a valid registry", file.display()))?;
        let base = file.parent().unwrap_or(Path::new("."));
        let mut plan = RegistryPlan {
            plugins_dir: parsed.plugins_dir.map(|d| base.join(d)),
            libraries: BTreeMap::new(),
            refused: Vec::new(),
        };
        for (name, entry) in parsed.methods {
            let path = library_path(base, &entry.library);
            if let Err(reason) = check_inside(base, &entry.library, &path).and_then(|()| check_pin_format(entry.sha256.as_deref(), &path)) {
                plan.refused.push(Broken { path, reason: format!("method `{name}` in {}: {reason}", file.display()) });
                continue;
            }
            plan.libraries.entry(path).or_default().insert(name, entry);
        }
        Ok(plan)
    }

    /// The library files it names.
    pub fn library_paths(&self) -> impl Iterator<Item = &Path> {
        self.libraries.keys().map(PathBuf::as_path)
    }
}

impl Registry {
    /// Loads every plugin named by `sources`. Broken libraries are recorded, not fatal; two
    /// libraries declaring the same method name are an error naming both.
    pub fn load(sources: &Sources) -> Result<Registry> {
        let mut registry = Registry::default();
        let mut loaded: HashMap<PathBuf, Vec<String>> = HashMap::new();
        let mut wanted: Vec<(PathBuf, Option<BTreeMap<String, RegistryEntry>>)> = Vec::new();
        let mut plugins_dir = sources.plugins_dir.clone();

        if let Some(file) = &sources.registry_file {
            let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
            let parsed = RegistryPlan::parse(file, &text)?;
            if plugins_dir.is_none() {
                plugins_dir = parsed.plugins_dir;
            }
            registry.broken.extend(parsed.refused);
            wanted.extend(parsed.libraries.into_iter().map(|(p, e)| (p, Some(e))));
        }
        if let Some(dir) = &plugins_dir {
            if dir.is_dir() {
                let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                    .with_context(|| format!("cannot list the plugins folder {}", dir.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| LIBRARY_EXTENSIONS.iter().any(|e| x == *e)))
                    .collect();
                files.sort();
                wanted.extend(files.into_iter().map(|p| (p, None)));
            } else if sources.plugins_dir.is_some() {
                bail!("plugins folder {} does not exist", dir.display());
            }
        }

        let host = host_callbacks(sources.threads);
        for (path, entries) in wanted {
            let key = path.canonicalize().unwrap_or_else(|_| path.clone());
            if loaded.contains_key(&key) {
                continue;
            }
            if let Some(entries) = &entries {
                let enabled = entries.values().any(|e| e.enabled);
                for (name, _) in entries.iter().filter(|(_, e)| !e.enabled) {
                    registry.disabled.push((name.clone(), path.clone()));
                }
                if !enabled {
                    continue;
                }
                if !path.exists() {
                    let reason = "does not exist; build it (`cargo build --release` builds the workspace's plugins) \
                                  or correct its `library` path in the registry"
                        .to_string();
                    registry.broken.push(Broken { path, reason });
                    continue;
                }
                let pins: Vec<&str> = entries.values().filter_map(|e| e.sha256.as_deref()).collect();
                if let Err(reason) = check_pins(&path, &pins) {
                    registry.broken.push(Broken { path, reason });
                    continue;
                }
            }
            if !sources.allow_insecure {
                if let Err(reason) = check_not_writable_by_others(&path) {
                    registry.broken.push(Broken { path, reason });
                    continue;
                }
            }
            let methods = match open_library(&path, host) {
                Ok(m) => m,
                Err(reason) => {
                    registry.broken.push(Broken { path, reason });
                    continue;
                }
            };
            let names: Vec<String> = methods.iter().map(|m| m.info().name.clone()).collect();
            if let Some(entries) = &entries {
                let missing: Vec<&String> = entries.keys().filter(|n| !names.contains(n)).collect();
                if !missing.is_empty() {
                    let reason = format!(
                        "registry names method(s) {} for this library, but it declares only: {}",
                        missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                        names.join(", ")
                    );
                    registry.broken.push(Broken { path, reason });
                    continue;
                }
            }
            for client in methods {
                let name = client.info().name.clone();
                let disabled = entries.as_ref().and_then(|e| e.get(&name)).is_some_and(|e| !e.enabled);
                if disabled {
                    continue;
                }
                if let Err(reason) = requirements::parse_all(&client.info().required_packages) {
                    registry.broken.push(Broken { path: path.clone(), reason: format!("method `{name}`: {reason}") });
                    continue;
                }
                if let Some(existing) = registry.methods.get(&name) {
                    bail!(
                        "two plugins declare the method `{name}`: {} and {}; remove or disable one \
                         (`enabled = false` in registry.toml)",
                        existing.origin.library().display(),
                        path.display()
                    );
                }
                let origin = if entries.is_some() { Origin::Registry(path.clone()) } else { Origin::DropIn(path.clone()) };
                registry.methods.insert(name, Method { client: Arc::new(client), origin });
            }
            loaded.insert(key, names);
        }
        // Said on stderr too, so that a command failing for want of the method shows why.
        for b in &registry.broken {
            log::warn!("skipping {}: {}", b.path.display(), b.reason);
        }
        Ok(registry)
    }

    /// The method called `name`, or an error listing the ones there are.
    pub fn get(&self, name: &str) -> Result<&Method> {
        if let Some(m) = self.methods.get(name) {
            return Ok(m);
        }
        if let Some((_, path)) = self.disabled.iter().find(|(n, _)| n == name) {
            bail!("method `{name}` is disabled in the registry ({})", path.display());
        }
        let known: Vec<&str> = self.methods.keys().map(String::as_str).collect();
        let broken = if self.broken.is_empty() {
            String::new()
        } else {
            format!(" ({} plugin file(s) could not be loaded: see `kvant list`)", self.broken.len())
        };
        bail!(
            "no method named `{name}`; available: {}{broken}",
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        )
    }

    /// The method that reads a checkpoint with this `quantization_config`, if any.
    pub fn for_checkpoint(&self, qc: &serde_json::Map<String, serde_json::Value>) -> Option<&Method> {
        self.methods.values().find(|m| {
            m.client.info().answers_to.iter().any(|pattern| pattern.iter().all(|(k, v)| qc.get(k) == Some(v)))
        })
    }

    /// All usable methods, by name.
    pub fn methods(&self) -> impl Iterator<Item = (&str, &Method)> {
        self.methods.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Libraries that could not be used.
    pub fn broken(&self) -> &[Broken] {
        &self.broken
    }

    /// Methods switched off in the registry.
    pub fn disabled(&self) -> &[(String, PathBuf)] {
        &self.disabled
    }
}

/// A relative `library` must stay inside the registry's folder, through `..` or through links;
/// an absolute one is the user's explicit choice.
fn check_inside(base: &Path, library: &Path, resolved: &Path) -> Result<(), String> {
    if library.is_absolute() {
        return Ok(());
    }
    if library.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(format!("library path `{}` leaves the registry's folder through `..`; refused", library.display()));
    }
    if let (Ok(root), Ok(real)) = (base.canonicalize(), resolved.canonicalize()) {
        if !real.starts_with(&root) {
            return Err(format!(
                "library path `{}` leads outside the registry's folder (to {}) through a link; refused",
                library.display(),
                real.display()
            ));
        }
    }
    Ok(())
}

/// Refuses a library that another user could replace: the file or its folder writable by its
/// group or by everyone. Loading it would run whatever they put there.
fn check_not_writable_by_others(path: &Path) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let real = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        let folder = real.parent().map(Path::to_path_buf).unwrap_or_default();
        for (what, p) in [("file", &real), ("folder", &folder)] {
            if let Ok(meta) = std::fs::metadata(p) {
                let mode = meta.permissions().mode();
                // Even a sticky folder (like /tmp) lets others add libraries a folder scan would load.
                if mode & 0o022 != 0 {
                    return Err(format!(
                        "its {what} {} is writable by other users (mode {:o}), so anyone could replace the code kvant \
                         would run; fix with `chmod go-w {}`, or pass --allow-insecure-plugins",
                        p.display(),
                        mode & 0o7777,
                        p.display()
                    ));
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// A pin must be a SHA-256 digest in hex, as `sha256sum` prints it; anything else could never
/// match and would only be reported as a changed file.
fn check_pin_format(pin: Option<&str>, library: &Path) -> Result<(), String> {
    match pin {
        Some(pin) if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) => Err(format!(
            "sha256 `{pin}` is not 64 hexadecimal digits; pin what `sha256sum {}` prints",
            library.display()
        )),
        _ => Ok(()),
    }
}

fn check_pins(path: &Path, pins: &[&str]) -> Result<(), String> {
    if pins.is_empty() {
        return Ok(());
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read it to check its sha256: {e}"))?;
    let actual = format!("{:x}", Sha256::digest(&bytes));
    for pin in pins {
        if !pin.eq_ignore_ascii_case(&actual) {
            return Err(format!(
                "sha256 is {actual}, but registry.toml pins {pin}; the file changed since it was pinned \
                 (not opened)"
            ));
        }
    }
    Ok(())
}

/// Opens the single library at `path`, outside any registry, lending it `threads` threads:
/// its methods, or why it cannot be used (the reason `kvant list` would show).
pub fn open_plugin(path: &Path, threads: usize) -> Result<Vec<MethodClient>, String> {
    open_library(path, host_callbacks(threads))
}

/// The contract rule: same MAJOR, and a MINOR no older than `oldest`. A plugin of an older minor
/// lacks entries the host's method table has, which abi_stable's layout check refuses; saying so
/// here gives the user the versions and the remedy instead of a layout dump.
fn contract_compatible(theirs: &str, ours: &str, oldest: &str) -> Result<(), String> {
    let parse = |v: &str| -> Option<(u32, u32)> {
        let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
        Some((parts.next()??, parts.next()??))
    };
    let (Some((their_major, their_minor)), Some((major, _)), Some((_, minor))) = (parse(theirs), parse(ours), parse(oldest))
    else {
        return Err(format!("declares contract version `{theirs}`, which is not MAJOR.MINOR.PATCH"));
    };
    if their_major != major {
        return Err(format!(
            "was built against plugin contract {theirs}, but this host needs contract {major}.x; rebuild it \
             against kvant-plugin-api {ours}"
        ));
    }
    if their_minor < minor {
        return Err(format!(
            "was built against plugin contract {theirs}, older than the {major}.{minor} this host's {ours} \
             still loads; rebuild it against kvant-plugin-api {major}.{minor} or newer (its source needs no change)"
        ));
    }
    Ok(())
}

/// Opens one library and returns its methods, or why it cannot be used.
fn open_library(path: &Path, host: HostCallbacksRef) -> Result<Vec<MethodClient>, String> {
    let header = lib_header_from_path(path).map_err(|e| match e {
        LibraryError::OpenError { .. } => format!("cannot be opened as a shared library: {}", one_line(&e)),
        LibraryError::GetSymbolError { .. } => "is not a kvant plugin (it exports no plugin root module)".into(),
        other => format!("is not a usable kvant plugin: {}", one_line(&other)),
    })?;
    let theirs = header.version_strings().version.as_str();
    contract_compatible(theirs, CONTRACT_VERSION, OLDEST_LOADABLE_CONTRACT)?;
    let module = header.check_layout::<PluginModRef>().map_err(|e| {
        format!(
            "says contract {theirs} but its types do not match this host's contract {CONTRACT_VERSION} \
             (built with a modified plugin-api?): {}",
            one_line(&e)
        )
    })?;
    let methods = methods_of(module, host).map_err(|e| format!("failed to start: {e}"))?;
    if methods.is_empty() {
        return Err("declares no methods".into());
    }
    Ok(methods)
}

fn one_line(e: &dyn std::fmt::Display) -> String {
    // abi_stable spreads one error over several lines: an open error's "at: / path / because: /
    // reason" fits in four, while a layout mismatch goes on for pages.
    let text = e.to_string();
    let parts: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).take(4).collect();
    parts.join(" ")
}

extern "C" fn plugin_log(level: u8, target: RStr<'_>, message: RStr<'_>) {
    let level = match level {
        1 => log::Level::Error,
        2 => log::Level::Warn,
        3 => log::Level::Info,
        4 => log::Level::Debug,
        _ => log::Level::Trace,
    };
    log::log!(target: "plugin", level, "[{}] {}", target.as_str(), message.as_str());
}

extern "C" fn plugin_progress(done: u64, total: u64, message: RStr<'_>) {
    crate::progress::inner(done, total, message.as_str());
}

fn host_callbacks(threads: usize) -> HostCallbacksRef {
    let max_log_level = match log::max_level() {
        log::LevelFilter::Off => 0,
        log::LevelFilter::Error => 1,
        log::LevelFilter::Warn => 2,
        log::LevelFilter::Info => 3,
        log::LevelFilter::Debug => 4,
        log::LevelFilter::Trace => 5,
    };
    HostCallbacks { threads: threads.max(1) as u32, max_log_level, log: plugin_log, progress: plugin_progress }.leak()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_library_paths_stay_inside_the_registry_folder() {
        let root = tempfile::tempdir().unwrap();
        let base = root.path().join("reg");
        std::fs::create_dir_all(base.join("libs")).unwrap();
        std::fs::write(root.path().join("outside.so"), b"x").unwrap();
        std::fs::write(base.join("libs/inside.so"), b"x").unwrap();
        let ok = Path::new("libs/inside.so");
        assert!(check_inside(&base, ok, &base.join(ok)).is_ok());
        let up = Path::new("../outside.so");
        assert!(check_inside(&base, up, &base.join(up)).unwrap_err().contains("through `..`"));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(root.path().join("outside.so"), base.join("libs/link.so")).unwrap();
            let link = Path::new("libs/link.so");
            assert!(check_inside(&base, link, &base.join(link)).unwrap_err().contains("through a link"));
        }
        let abs = root.path().join("outside.so");
        assert!(check_inside(&base, &abs, &abs).is_ok(), "an absolute path is the user's explicit choice");
    }

    #[test]
    fn contract_versions_need_same_major_and_no_minor_older_than_the_oldest_loadable() {
        assert!(contract_compatible("1.2.0", "1.2.0", "1.1.0").is_ok());
        assert!(contract_compatible("1.1.0", "1.2.0", "1.1.0").is_ok());
        assert!(contract_compatible("1.4.2", "1.2.0", "1.1.0").is_ok());
        let older = contract_compatible("1.0.0", "1.2.0", "1.1.0").unwrap_err();
        assert!(older.contains("1.0.0") && older.contains("older than the 1.1 this host's 1.2.0") && older.contains("rebuild"), "{older}");
        let other = contract_compatible("2.0.0", "1.2.0", "1.1.0").unwrap_err();
        assert!(other.contains("2.0.0") && other.contains("needs contract 1.x"), "{other}");
        assert!(contract_compatible("one", "1.2.0", "1.1.0").unwrap_err().contains("not MAJOR.MINOR.PATCH"));
    }

    #[cfg(unix)]
    #[test]
    fn libraries_others_can_replace_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libx.so");
        std::fs::write(&lib, b"x").unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check_not_writable_by_others(&lib).is_ok());
        std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = check_not_writable_by_others(&lib).unwrap_err();
        assert!(e.contains("writable by other users") && e.contains("chmod go-w") && e.contains("--allow-insecure-plugins"), "{e}");
        std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(check_not_writable_by_others(&lib).unwrap_err().contains("its folder"));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(check_not_writable_by_others(&lib).is_err(), "others could add libraries to a sticky folder");
    }
}
