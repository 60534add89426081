//! `required_packages`: what a method needs from the machine, checked by the host before any
//! of the method's own code runs, and reported all at once with a remedy.

use std::fmt;

use kvant_plugin_api::{Environment, CONTRACT_VERSION};

/// One parsed requirement string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// `cpu:<feature>`: a CPU feature detected at run time.
    Cpu(String),
    /// `lib:<soname>`: a shared library that must load.
    Lib(String),
    /// `host:>=X.Y`: the minimum contract version.
    Host(u32, u32),
    /// `calibration`: calibration data must be supplied.
    Calibration,
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirement::Cpu(x) => write!(f, "cpu:{x}"),
            Requirement::Lib(x) => write!(f, "lib:{x}"),
            Requirement::Host(a, b) => write!(f, "host:>={a}.{b}"),
            Requirement::Calibration => f.write_str("calibration"),
        }
    }
}

/// CPU features a requirement may name, as `std::arch` spells them.
const CPU_FEATURES: &[&str] = &[
    "sse4.1", "sse4.2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512dq",
    "avx512vnni", "avx512bf16", "avx512fp16", "neon",
];

/// The CPU features this machine has, from [`CPU_FEATURES`].
pub fn cpu_features() -> Vec<String> {
    CPU_FEATURES.iter().filter(|f| has_cpu_feature(f)).map(|f| f.to_string()).collect()
}

fn has_cpu_feature(name: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match name {
            "sse4.1" => std::arch::is_x86_feature_detected!("sse4.1"),
            "sse4.2" => std::arch::is_x86_feature_detected!("sse4.2"),
            "avx" => std::arch::is_x86_feature_detected!("avx"),
            "avx2" => std::arch::is_x86_feature_detected!("avx2"),
            "fma" => std::arch::is_x86_feature_detected!("fma"),
            "f16c" => std::arch::is_x86_feature_detected!("f16c"),
            "bmi2" => std::arch::is_x86_feature_detected!("bmi2"),
            "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
            "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
            "avx512vl" => std::arch::is_x86_feature_detected!("avx512vl"),
            "avx512dq" => std::arch::is_x86_feature_detected!("avx512dq"),
            "avx512vnni" => std::arch::is_x86_feature_detected!("avx512vnni"),
            "avx512bf16" => std::arch::is_x86_feature_detected!("avx512bf16"),
            "avx512fp16" => std::arch::is_x86_feature_detected!("avx512fp16"),
            _ => false,
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        name == "neon" && std::arch::is_aarch64_feature_detected!("neon")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = name;
        false
    }
}

/// Parses one requirement string.
pub fn parse(s: &str) -> Result<Requirement, String> {
    let s = s.trim();
    if s == "calibration" {
        return Ok(Requirement::Calibration);
    }
    let (kind, value) = s.split_once(':').ok_or_else(|| {
        format!("requirement `{s}` has no kind; expected cpu:<feature>, lib:<soname>, host:>=X.Y or calibration")
    })?;
    match kind {
        "cpu" if CPU_FEATURES.contains(&value) => Ok(Requirement::Cpu(value.into())),
        "cpu" => Err(format!("requirement `{s}` names an unknown CPU feature; known: {}", CPU_FEATURES.join(", "))),
        "lib" if !value.is_empty() => Ok(Requirement::Lib(value.into())),
        "host" => {
            let v = value.strip_prefix(">=").ok_or_else(|| format!("requirement `{s}`: expected host:>=X.Y"))?;
            let (a, b) = v.split_once('.').unwrap_or((v, "0"));
            match (a.parse(), b.parse()) {
                (Ok(a), Ok(b)) => Ok(Requirement::Host(a, b)),
                _ => Err(format!("requirement `{s}`: `{v}` is not a version X.Y")),
            }
        }
        _ => Err(format!(
            "requirement `{s}` is of unknown kind `{kind}`; expected cpu:<feature>, lib:<soname>, host:>=X.Y \
             or calibration"
        )),
    }
}

/// Parses every requirement, failing on the first malformed one.
pub fn parse_all(list: &[String]) -> Result<Vec<Requirement>, String> {
    list.iter().map(|s| parse(s)).collect()
}

fn contract() -> (u32, u32) {
    let mut parts = CONTRACT_VERSION.split('.').map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Checks `list` on this machine; returns every unmet requirement with what to do about it.
pub fn unmet(list: &[String], env: &Environment) -> Vec<String> {
    let mut problems = Vec::new();
    for raw in list {
        let req = match parse(raw) {
            Ok(r) => r,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        match &req {
            Requirement::Cpu(f) if !env.cpu_features.contains(f) => problems.push(format!(
                "{req}: this CPU lacks `{f}`; run on a machine that has it, or pick another method"
            )),
            Requirement::Lib(so) => {
                // Loading is the only reliable probe: it resolves the library's own dependencies.
                if let Err(e) = unsafe { libloading::Library::new(so) } {
                    problems.push(format!("{req}: cannot load `{so}` ({e}); install it or add its folder to LD_LIBRARY_PATH"));
                }
            }
            Requirement::Host(a, b) if contract() < (*a, *b) => problems.push(format!(
                "{req}: this host speaks contract {CONTRACT_VERSION}; upgrade kvant"
            )),
            Requirement::Calibration if !env.calibration => {
                problems.push(format!("{req}: this method needs calibration data; pass --calibration FILE..."))
            }
            _ => {}
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Environment {
        Environment { cpu_features: vec!["avx2".into()], calibration: false, ..Default::default() }
    }

    #[test]
    fn parses_every_kind_and_rejects_unknown_ones() {
        assert_eq!(parse("cpu:avx2"), Ok(Requirement::Cpu("avx2".into())));
        assert_eq!(parse("lib:libm.so.6"), Ok(Requirement::Lib("libm.so.6".into())));
        assert_eq!(parse("host:>=1.2"), Ok(Requirement::Host(1, 2)));
        assert_eq!(parse("calibration"), Ok(Requirement::Calibration));
        assert!(parse("gpu:cuda").unwrap_err().contains("unknown kind `gpu`"));
        assert!(parse("cpu:warp-drive").unwrap_err().contains("unknown CPU feature"));
        assert!(parse("host:1.2").unwrap_err().contains("host:>=X.Y"));
    }

    #[test]
    fn reports_every_unmet_requirement_at_once() {
        let list: Vec<String> =
            ["cpu:avx2", "cpu:neon", "lib:libkvant-does-not-exist.so", "host:>=99.0", "calibration", "lib:libc.so.6"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let problems = unmet(&list, &env());
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(problems[0].starts_with("cpu:neon"));
        assert!(problems[1].contains("libkvant-does-not-exist.so"));
        assert!(problems[2].contains("upgrade kvant"));
        assert!(problems[3].contains("--calibration"));
    }
}
