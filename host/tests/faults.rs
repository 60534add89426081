//! `kvant quantize` under faults, through the real binary: killed with SIGKILL at several
//! points then continued with `--resume` (byte-identical to an uninterrupted run), a resume
//! whose options changed (starts over, saying why), and output writes that fail like a full disk.

#[allow(dead_code)]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{registry_for, text, write_llama, Plugin};
use kvant::resume::partial_dir;
use kvant_plugin_api::DType;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// A model, a registry with rtn (and bnb), and room for outputs.
struct Setup {
    tmp: TempDir,
    model: PathBuf,
    registry: PathBuf,
    /// The method and its options, given one setting that tests vary.
    method: fn(u32) -> Vec<String>,
}

fn setup() -> Setup {
    setup_for(|bits| ["--method", "rtn", "--set", &format!("bits={bits}"), "--set", "group_size=32"].map(String::from).into())
}

fn setup_for(method: fn(u32) -> Vec<String>) -> Setup {
    let tmp = TempDir::new().unwrap();
    let model = tmp.path().join("model");
    write_llama(&model, DType::F32, 11);
    let registry = registry_for(tmp.path(), &[("rtn", Plugin::Rtn), ("bnb-nf4", Plugin::Bnb)]);
    Setup { tmp, model, registry, method }
}

impl Setup {
    fn command(&self, out: &Path, setting: u32, extra: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvant"));
        cmd.arg("--registry")
            .arg(&self.registry)
            .args(["--threads", "2", "quantize"])
            .arg(&self.model)
            .args((self.method)(setting))
            .arg("-o")
            .arg(out)
            .args(extra)
            .env_remove("KVANT_REGISTRY")
            .env_remove("KVANT_PLUGINS_DIR")
            .env_remove("KVANT_TEST_PAUSE_AFTER_MODULE_MS")
            .env_remove("KVANT_TEST_FAIL_AFTER_BYTES");
        cmd
    }

    fn run(&self, out: &Path, bits: u32, extra: &[&str]) -> Output {
        self.command(out, bits, extra).output().unwrap()
    }
}

/// Every file of a folder with its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect()
}

fn hashes(dir: &Path) -> BTreeMap<String, String> {
    files(dir).into_iter().map(|(n, b)| (n, format!("{:x}", Sha256::digest(b)))).collect()
}

/// Modules the journal of `out`'s partial folder records as written (lines after the fingerprint).
fn journaled(out: &Path) -> usize {
    std::fs::read_to_string(partial_dir(out).join("kvant-journal.jsonl"))
        .map_or(0, |t| t.lines().count().saturating_sub(1))
}

/// Starts a run slowed down after each module, waits until `modules` modules are journaled,
/// and kills it with SIGKILL. Returns its stderr so far.
fn kill_after(s: &Setup, out: &Path, bits: u32, modules: usize, extra: &[&str]) -> String {
    let mut child = s
        .command(out, bits, extra)
        .env("KVANT_TEST_PAUSE_AFTER_MODULE_MS", "300")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while journaled(out) < modules || !partial_dir(out).join("kvant-journal.jsonl").exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before {modules} modules were written");
        assert!(started.elapsed() < Duration::from_secs(60), "no progress in the journal of {}", out.display());
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    assert!(!out.exists(), "a killed run left {} behind", out.display());
    assert!(partial_dir(out).is_dir(), "a killed run left no partial folder");
    text(&output.stderr)
}

#[test]
fn killed_runs_resume_to_the_bytes_of_an_uninterrupted_run() {
    let s = setup();
    let reference = s.tmp.path().join("reference");
    let done = s.run(&reference, 4, &[]);
    assert!(done.status.success(), "{}", text(&done.stderr));

    let out = s.tmp.path().join("out");
    // Right after the journal is started, after 2 modules, then after 6 (all 4 Linears and
    // some dense modules): each kill lands on a run that resumed the previous one.
    let mut previous = 0;
    for (i, at) in [0, 2, 6].into_iter().enumerate() {
        let resume: &[&str] = if i == 0 { &[] } else { &["--resume"] };
        let stderr = kill_after(&s, &out, 4, at, resume);
        if i > 0 {
            assert!(stderr.contains(&format!("{previous} module(s) already written")), "{stderr}");
        }
        previous = journaled(&out);
        assert!(previous >= at);
    }
    let resumed = s.run(&out, 4, &["--resume"]);
    let stderr = text(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("resuming {}: {previous} module(s) already written", partial_dir(&out).display())), "{stderr}");
    // The report still covers every module, those from earlier runs included.
    assert!(text(&resumed.stdout).contains("4 converted"), "{}", text(&resumed.stdout));
    assert_eq!(files(&out), files(&reference), "the resumed output differs from an uninterrupted run");
    assert!(!partial_dir(&out).exists());
}

#[test]
fn killed_runs_with_lengths_settled_by_the_method_resume_to_the_same_bytes() {
    // bnb-nf4 with double quant plans its quant_state JSON with a variable length (it holds an
    // offset found while quantizing): the journal keeps the lengths the killed run wrote.
    let s = setup_for(|blocksize| {
        ["--method", "bnb-nf4", "--set", "bnb_4bit_use_double_quant=true", "--set", &format!("bnb_4bit_blocksize={blocksize}")]
            .map(String::from)
            .into()
    });
    let reference = s.tmp.path().join("reference");
    let done = s.run(&reference, 32, &[]);
    assert!(done.status.success(), "{}", text(&done.stderr));
    let out = s.tmp.path().join("out");
    kill_after(&s, &out, 32, 3, &[]);
    let journal = std::fs::read_to_string(partial_dir(&out).join("kvant-journal.jsonl")).unwrap();
    assert!(journal.contains("\"lengths\":{\"model.layers.0.") && journal.contains("quant_state.bitsandbytes__nf4\":"), "{journal}");
    let resumed = s.run(&out, 32, &["--resume"]);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    assert_eq!(files(&out), files(&reference), "the resumed output differs from an uninterrupted run");

    // Exactly bitsandbytes' JSON, no padding, and the file is whole for the safetensors crate.
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let state = st.tensor("model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4").unwrap();
    let text = std::str::from_utf8(state.data()).unwrap();
    assert!(text.starts_with("{\"quant_type\": \"nf4\", \"blocksize\": 32,") && text.ends_with('}'), "{text:?}");
    assert!(text.contains("\"nested_offset\": ") && !text.contains("  ") && !text.ends_with(" }"), "{text:?}");
}

#[test]
fn resume_with_other_options_starts_over_and_names_the_difference() {
    let s = setup();
    let out = s.tmp.path().join("out");
    kill_after(&s, &out, 4, 2, &[]);

    let resumed = s.run(&out, 8, &["--resume"]);
    let stderr = text(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains("not resuming") && stderr.contains("options (bits: 4 -> 8)"), "{stderr}");
    let reference = s.tmp.path().join("reference");
    assert!(s.run(&reference, 8, &[]).status.success());
    assert_eq!(files(&out), files(&reference));
}

#[test]
fn resume_after_the_input_changed_starts_over_naming_the_file() {
    let s = setup();
    let out = s.tmp.path().join("out");
    kill_after(&s, &out, 4, 2, &[]);
    // Same size, newer modification time: the fingerprint cannot tell it is harmless.
    let config = s.model.join("config.json");
    let file = std::fs::File::options().write(true).open(&config).unwrap();
    file.set_modified(std::time::SystemTime::now() + Duration::from_secs(5)).unwrap();

    let resumed = s.run(&out, 4, &["--resume"]);
    let stderr = text(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains("not resuming") && stderr.contains("input files (config.json:"), "{stderr}");
}

#[test]
fn without_resume_a_partial_folder_is_discarded_with_a_warning() {
    let s = setup();
    let out = s.tmp.path().join("out");
    kill_after(&s, &out, 4, 2, &[]);
    let fresh = s.run(&out, 4, &[]);
    let stderr = text(&fresh.stderr);
    assert!(fresh.status.success(), "{stderr}");
    assert!(stderr.contains("discarding") && stderr.contains("--resume"), "{stderr}");
}

#[test]
fn a_failing_write_leaves_the_input_untouched_and_no_output() {
    let s = setup();
    let before = hashes(&s.model);
    let out = s.tmp.path().join("out");
    let failed = s.command(&out, 4, &[]).env("KVANT_TEST_FAIL_AFTER_BYTES", "20000").output().unwrap();
    let stderr = text(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    let shard = partial_dir(&out).join("model.safetensors");
    assert!(stderr.contains("no space left on device") && stderr.contains(&shard.display().to_string()), "{stderr}");
    assert!(stderr.contains("was not created"), "{stderr}");
    assert!(!out.exists());
    assert_eq!(hashes(&s.model), before, "the input changed");

    // Once the disk has room again, the kept partial folder is continued.
    let resumed = s.run(&out, 4, &["--resume"]);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    let reference = s.tmp.path().join("reference");
    assert!(s.run(&reference, 4, &[]).status.success());
    assert_eq!(files(&out), files(&reference));
    assert_eq!(hashes(&s.model), before);
}

#[test]
fn a_module_past_its_timeout_stops_the_run_naming_module_and_method() {
    let tmp = TempDir::new().unwrap();
    let model = tmp.path().join("model");
    write_llama(&model, DType::F32, 3);
    let registry = registry_for(tmp.path(), &[("slow", Plugin::Slow)]);
    let out = tmp.path().join("out");
    let started = Instant::now();
    let run = Command::new(env!("CARGO_BIN_EXE_kvant"))
        .arg("--registry")
        .arg(&registry)
        .arg("quantize")
        .arg(&model)
        .args(["--method", "slow", "--module-timeout", "1", "-o"])
        .arg(&out)
        .env_remove("KVANT_REGISTRY")
        .env_remove("KVANT_PLUGINS_DIR")
        .output()
        .unwrap();
    let stderr = text(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    // The fixture sleeps ten minutes in the call; the host gives up after one second.
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(
        stderr.contains("method `slow` did not finish module `model.layers.0.mlp.down_proj` within 1 s"),
        "{stderr}"
    );
    assert!(!out.exists());
}

/// Runs `method` of a faulty fixture plugin on a fresh model, with `extra` arguments.
fn run_faulty(method: &str, plugin: Plugin, extra: &[&str]) -> (TempDir, PathBuf, Output) {
    let tmp = TempDir::new().unwrap();
    let model = tmp.path().join("model");
    write_llama(&model, DType::F32, 4);
    let registry = registry_for(tmp.path(), &[(method, plugin)]);
    let out = tmp.path().join("out");
    let run = Command::new(env!("CARGO_BIN_EXE_kvant"))
        .arg("--registry")
        .arg(&registry)
        .arg("quantize")
        .arg(&model)
        .args(["--method", method, "--json", "-o"])
        .arg(&out)
        .args(extra)
        .env_remove("KVANT_REGISTRY")
        .env_remove("KVANT_PLUGINS_DIR")
        .output()
        .unwrap();
    (tmp, model, run)
}

#[test]
fn skip_failed_modules_keeps_them_dense_and_reports_why() {
    let cases = [("bad-nan", Plugin::BadOutput, "NaN"), ("bad-shape", Plugin::BadOutput, "the plan announced"), ("panic-quantize", Plugin::Panicky, "panicked")];
    for (method, plugin, fault) in cases {
        let (tmp, model, stopped) = run_faulty(method, plugin, &[]);
        assert_eq!(stopped.status.code(), Some(1), "{method}: {}", text(&stopped.stderr));
        assert!(!tmp.path().join("out").exists());

        let (tmp, _, kept) = run_faulty(method, plugin, &["--skip-failed-modules"]);
        let stderr = text(&kept.stderr);
        assert!(kept.status.success(), "{method}: {stderr}");
        let report: serde_json::Value = serde_json::from_slice(&kept.stdout).unwrap();
        let dense: Vec<(String, String)> =
            serde_json::from_value(report["quantization"]["not_converted"].clone()).unwrap();
        let failed: Vec<&(String, String)> = dense.iter().filter(|(_, why)| why.starts_with("quantize failed")).collect();
        // The fixture fails on every Linear; each is listed, with the plugin's fault.
        assert_eq!(failed.len(), common::LLAMA_LINEARS.len(), "{dense:?}");
        assert!(failed.iter().all(|(_, why)| why.contains(fault)), "{failed:?}");
        // Kept dense means the input's weights, bytes unchanged.
        let input = kvant::checkpoint::Checkpoint::open(&model).unwrap();
        let output = kvant::checkpoint::Checkpoint::open(tmp.path().join("out")).unwrap();
        for (name, _, _) in common::LLAMA_LINEARS {
            let name = format!("{name}.weight");
            assert_eq!(input.view(&name).unwrap().data, output.view(&name).unwrap().data, "{name}");
        }
    }
}
