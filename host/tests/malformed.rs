//! The malformed-input corpus: every case in `tests/malformed/expected.toml` runs the `kvant`
//! binary on hand-made bad files and must give exactly the recorded messages and exit code, and
//! never panic. The table's header describes its keys; adding a case is adding its folder under
//! `tests/malformed/` and its table. A mismatch prints the actual output as a table, to paste only
//! after reading it: each message must name the file, tensor or key and say what is wrong.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    args: Vec<String>,
    exit: i32,
    stderr: String,
    #[serde(default)]
    stdout: String,
    #[serde(default)]
    plugins: Vec<String>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("host/ is inside the repository").to_path_buf()
}

fn corpus() -> PathBuf {
    repo_root().join("tests").join("malformed")
}

fn cases() -> BTreeMap<String, Case> {
    let path = corpus().join("expected.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    toml::from_str(&text).unwrap_or_else(|e| panic!("{} is not a valid case table: {e}", path.display()))
}

/// The registry a case runs with: none of the plugins unless it names some, which must be built.
fn registry_for(name: &str, case: &Case) -> Result<PathBuf, String> {
    if case.plugins.is_empty() {
        return Ok(corpus().join("no-plugins.toml"));
    }
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_kvant")).parent().expect("the binary is in a folder").to_path_buf();
    for lib in &case.plugins {
        let file = bin_dir.join(format!("{}{lib}{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX));
        if !file.is_file() {
            return Err(format!(
                "case `{name}` needs {}: run `cargo build --release --workspace` first (scripts/test.sh does)",
                file.display()
            ));
        }
    }
    Ok(repo_root().join("registry.toml"))
}

/// Runs one case; `Err` describes every difference from the table.
fn run(name: &str, case: &Case) -> Result<(), String> {
    let registry = registry_for(name, case)?;
    let tmp = tempfile::tempdir().map_err(|e| format!("case `{name}`: no temporary folder: {e}"))?;
    let tmp_path = tmp.path().to_string_lossy().into_owned();
    let args: Vec<String> = case.args.iter().map(|a| a.replace("{tmp}", &tmp_path)).collect();
    let output = Command::new(env!("CARGO_BIN_EXE_kvant"))
        .args(&args)
        .current_dir(corpus())
        .env("KVANT_REGISTRY", &registry)
        .env_remove("KVANT_PLUGINS_DIR")
        .env_remove("KVANT_THREADS")
        .env_remove("RUST_BACKTRACE")
        .output()
        .map_err(|e| format!("case `{name}`: cannot run kvant: {e}"))?;
    let corpus_path = corpus().to_string_lossy().into_owned();
    let normalize = |bytes: &[u8]| {
        String::from_utf8_lossy(bytes).replace(&tmp_path, "{tmp}").replace(&corpus_path, "{corpus}")
    };
    let (stdout, stderr) = (normalize(&output.stdout), normalize(&output.stderr));
    let code = output.status.code();

    let mut problems = Vec::new();
    if stderr.contains("panicked") || code == Some(101) {
        problems.push("kvant panicked: every malformed input must give an error, never a crash".to_string());
    }
    if code != Some(case.exit) {
        problems.push(format!("exit code {code:?}, expected {}", case.exit));
    }
    if stderr != case.stderr {
        problems.push(format!("stderr differs; expected:\n{}", case.stderr));
    }
    if stdout != case.stdout {
        problems.push(format!("stdout differs; expected:\n{}", case.stdout));
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(format!(
        "case `{name}` (kvant {}):\n{}\nactual, as a table row:\n[{name}]\nexit = {}\nstderr = '''\n{stderr}'''\nstdout = '''\n{stdout}'''",
        case.args.join(" "),
        problems.join("\n"),
        code.map_or("none (killed by a signal)".to_string(), |c| c.to_string()),
    ))
}

#[test]
fn every_malformed_input_gives_its_recorded_error() {
    let cases = cases();
    assert!(cases.len() >= 40, "the corpus lost cases: {} left", cases.len());
    let failures: Vec<String> = cases.iter().filter_map(|(name, case)| run(name, case).err()).collect();
    assert!(failures.is_empty(), "{} of {} cases failed:\n\n{}", failures.len(), cases.len(), failures.join("\n\n"));
}

#[test]
fn every_case_folder_has_a_row() {
    let cases = cases();
    let mut orphans = Vec::new();
    for entry in std::fs::read_dir(corpus()).expect("tests/malformed exists") {
        let entry = entry.expect("a readable folder entry");
        if entry.path().is_dir() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !cases.contains_key(&name) {
                orphans.push(name);
            }
        }
    }
    assert!(orphans.is_empty(), "folders of tests/malformed without a row in expected.toml: {orphans:?}");
}
