//! Resuming an interrupted `kvant quantize` (`--resume`).
//!
//! A quantization writes into a temporary folder beside `OUT` whose name depends only on `OUT`
//! (`.OUT.kvant-partial`), so a later run can find it. The folder holds a journal: a first line
//! with the run's [`Fingerprint`], then one line per module whose output tensors were fully
//! written and synced to disk. `OUT` itself only appears, complete, through the writer's final
//! rename; a `kill -9` leaves the partial folder and nothing that looks finished.
//!
//! Syncing costs a wait on the disk, so finished modules are journaled in batches, at most
//! [`JOURNAL_INTERVAL`] apart: a kill loses the modules of the last interval, which a resumed
//! run redoes; a run shorter than that never waits for the disk before its final sync.
//!
//! With `--resume`, a partial folder whose fingerprint equals the new run's is continued: the
//! modules in its journal are neither quantized nor written again. Any difference (input files,
//! method or plugin, options, kvant itself) starts over, saying which part differs. Without
//! `--resume`, a partial folder is discarded with a warning. A lock file keeps two runs from
//! writing the same partial folder at once.
//!
//! The hidden environment variables the fault tests use to pause or break a run live here too.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::checkpoint::{Checkpoint, Resumable, CONFIG_FILE};

/// The journal inside the partial folder.
const JOURNAL: &str = "kvant-journal.jsonl";
/// Held (flock) by the run writing the partial folder.
const LOCK: &str = "kvant.lock";
/// Test hook: journal every module at once and pause this many milliseconds after it, so that
/// a test can kill the process at a known point.
const PAUSE_ENV: &str = "KVANT_TEST_PAUSE_AFTER_MODULE_MS";

/// Longest time finished modules wait to be synced and journaled.
pub const JOURNAL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Test hook: the output writes fail, as on a full disk, after this many bytes.
const FAIL_WRITES_ENV: &str = "KVANT_TEST_FAIL_AFTER_BYTES";

/// The write budget a fault test set through `KVANT_TEST_FAIL_AFTER_BYTES`, if any.
pub fn injected_write_failure() -> Option<u64> {
    std::env::var(FAIL_WRITES_ENV).ok().and_then(|v| v.parse().ok())
}

/// The partial folder of output `out`: `.NAME.kvant-partial` beside it.
pub fn partial_dir(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    parent.join(format!(".{name}.kvant-partial"))
}

/// Everything a finished module's bytes depend on, by named part. Two runs with equal
/// fingerprints write the same output.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint(pub BTreeMap<String, Value>);

impl Fingerprint {
    /// Adds one named part.
    pub fn with(mut self, part: &str, value: impl Serialize) -> Self {
        self.0.insert(part.to_string(), serde_json::to_value(value).expect("fingerprint parts serialise"));
        self
    }

    /// The parts that differ from `earlier`, each with what changed, for the user.
    pub fn differences(&self, earlier: &Fingerprint) -> Vec<String> {
        let keys: HashSet<&String> = self.0.keys().chain(earlier.0.keys()).collect();
        let mut keys: Vec<&String> = keys.into_iter().collect();
        keys.sort();
        keys.into_iter()
            .filter_map(|k| {
                let (now, then) = (self.0.get(k), earlier.0.get(k));
                if now == then {
                    return None;
                }
                Some(match (now, then) {
                    (Some(Value::Object(a)), Some(Value::Object(b))) => {
                        let mut fields: Vec<&String> = a.keys().chain(b.keys()).collect();
                        fields.sort();
                        fields.dedup();
                        let changed: Vec<String> = fields
                            .into_iter()
                            .filter(|f| a.get(*f) != b.get(*f))
                            .map(|f| format!("{f}: {} -> {}", show(b.get(f)), show(a.get(f))))
                            .collect();
                        format!("{k} ({})", changed.join("; "))
                    }
                    _ => format!("{k} ({} -> {})", show(then), show(now)),
                })
            })
            .collect()
    }
}

fn show(v: Option<&Value>) -> String {
    v.map_or("absent".into(), Value::to_string)
}

/// Size and modification time of each input file: the shards and `config.json`.
pub fn input_files(checkpoint: &Checkpoint) -> Result<BTreeMap<String, Value>> {
    let config = checkpoint.model_dir().join(CONFIG_FILE);
    let mut files = BTreeMap::new();
    for path in checkpoint.shard_paths().chain(config.is_file().then_some(config.as_path())) {
        let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos());
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        files.insert(name, serde_json::json!({"bytes": meta.len(), "mtime_ns": mtime.map(|t| t.to_string())}));
    }
    Ok(files)
}

/// SHA-256 of a plugin library file: the same path may hold a rebuilt plugin.
pub fn library_hash(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read plugin library {}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// One journal line after the fingerprint: a module whose output tensors are on disk.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Done {
    /// Module name (empty for top-level tensors).
    pub module: String,
    /// Its output tensors, full names.
    pub tensors: Vec<String>,
    /// What the closing report says about it (the lifecycle's `ModuleReport`), if anything.
    #[serde(default)]
    pub report: Value,
    /// Byte lengths of those of its tensors whose length the method settled (variable-length
    /// tensors of the plan), which the writer needs to finish the shard.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub lengths: BTreeMap<String, u64>,
}

/// The journal of the current run, holding the partial folder's lock.
pub struct Journal {
    dir: PathBuf,
    file: File,
    /// Modules on disk and in the journal.
    done: HashMap<String, Done>,
    /// Modules written but not yet synced and journaled, since `last_sync`.
    pending: Vec<Done>,
    last_sync: std::time::Instant,
    pause: Option<std::time::Duration>,
    _lock: File,
}

impl Journal {
    /// Takes the partial folder of `out` for this run: continues it when `resume` is set and
    /// its fingerprint matches, otherwise empties it (saying why) and starts a new journal.
    pub fn open(out: &Path, force: bool, fingerprint: &Fingerprint, resume: bool) -> Result<Journal> {
        if !force && out.symlink_metadata().is_ok() {
            bail!("output {} already exists; choose another output folder, or pass --force to replace it", out.display());
        }
        let dir = partial_dir(out);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create temporary folder {}", dir.display()))?;
        let lock = File::create(dir.join(LOCK)).with_context(|| format!("cannot create {}", dir.join(LOCK).display()))?;
        if lock.try_lock().is_err() {
            bail!("another kvant run is writing {} (its temporary folder {} is locked)", out.display(), dir.display());
        }
        let earlier = read_journal(&dir.join(JOURNAL));
        let kept = match (&earlier, resume) {
            (Ok(Some((then, done))), true) => {
                let diff = fingerprint.differences(then);
                if diff.is_empty() {
                    log::warn!("resuming {}: {} module(s) already written", dir.display(), done.len());
                    Some(done.clone())
                } else {
                    log::warn!(
                        "not resuming {}: the run differs from the interrupted one in {}; starting over",
                        dir.display(),
                        diff.join(", ")
                    );
                    None
                }
            }
            (Ok(None), true) => {
                log::warn!("nothing to resume for {}: no interrupted run left a journal; starting from the beginning", out.display());
                None
            }
            (Err(e), true) => {
                log::warn!("not resuming {}: {e:#}; starting over", dir.display());
                None
            }
            (Ok(Some((_, done))), false) => {
                log::warn!(
                    "discarding {} ({} module(s) of an interrupted run); pass --resume to continue it instead",
                    dir.display(),
                    done.len()
                );
                None
            }
            (_, false) => None,
        };
        let journal_path = dir.join(JOURNAL);
        let done = match kept {
            Some(done) => done,
            None => {
                clear_except(&dir, LOCK)?;
                let mut file = File::create(&journal_path).with_context(|| format!("cannot create {}", journal_path.display()))?;
                writeln!(file, "{}", serde_json::to_string(fingerprint)?)
                    .and_then(|()| file.sync_all())
                    .with_context(|| format!("cannot write {}", journal_path.display()))?;
                Vec::new()
            }
        };
        let file = OpenOptions::new()
            .append(true)
            .open(&journal_path)
            .with_context(|| format!("cannot open {}", journal_path.display()))?;
        let pause = std::env::var(PAUSE_ENV).ok().and_then(|v| v.parse().ok()).map(std::time::Duration::from_millis);
        Ok(Journal {
            dir,
            file,
            done: done.into_iter().map(|d| (d.module.clone(), d)).collect(),
            pending: Vec::new(),
            last_sync: std::time::Instant::now(),
            pause,
            _lock: lock,
        })
    }

    /// The writer's view of the partial folder: where it is, what is already in it.
    pub fn resumable(&self) -> Resumable {
        Resumable {
            dir: self.dir.clone(),
            written: self.done.values().flat_map(|d| d.tensors.iter().cloned()).collect(),
            lengths: self.done.values().flat_map(|d| d.lengths.iter().map(|(k, &v)| (k.clone(), v))).collect(),
            scratch: vec![JOURNAL.into(), LOCK.into()],
        }
    }

    /// The journal entry of `module`, if an earlier run finished it.
    pub fn done(&self, module: &str) -> Option<&Done> {
        self.done.get(module)
    }

    /// Records `entry` once its tensors are durable: when [`JOURNAL_INTERVAL`] has passed since
    /// the last time (at once under the test pause), `sync` (the writer's) runs, then the lines
    /// of every module waiting are appended and synced.
    pub fn record(&mut self, entry: Done, sync: impl FnOnce() -> Result<()>) -> Result<()> {
        self.pending.push(entry);
        if self.pause.is_none() && self.last_sync.elapsed() < JOURNAL_INTERVAL {
            return Ok(());
        }
        sync()?;
        let path = self.dir.join(JOURNAL);
        let mut lines = String::new();
        for entry in &self.pending {
            lines += &serde_json::to_string(entry)?;
            lines.push('\n');
        }
        self.file
            .write_all(lines.as_bytes())
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("cannot write {}", path.display()))?;
        self.done.extend(self.pending.drain(..).map(|d| (d.module.clone(), d)));
        self.last_sync = std::time::Instant::now();
        if let Some(pause) = self.pause {
            std::thread::sleep(pause);
        }
        Ok(())
    }
}

impl Drop for Journal {
    /// After a failed run (the writer installs the folder on success, so it is gone then):
    /// the folder stays for `--resume` when it holds finished modules, and goes otherwise.
    fn drop(&mut self) {
        if !self.dir.exists() {
            return;
        }
        if self.done.is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            log::warn!("the {} finished module(s) are kept in {}; --resume continues from them", self.done.len(), self.dir.display());
        }
    }
}

/// The fingerprint and finished modules of a journal; `None` when there is no journal.
/// A torn last line (a kill mid-append) is ignored: its module is simply redone.
fn read_journal(path: &Path) -> Result<Option<(Fingerprint, Vec<Done>)>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut lines = BufReader::new(file).lines();
    let first = lines.next().transpose()?.ok_or_else(|| anyhow!("{} is empty", path.display()))?;
    let fingerprint: Fingerprint =
        serde_json::from_str(&first).with_context(|| format!("{} has no readable fingerprint", path.display()))?;
    let mut done = Vec::new();
    for line in lines {
        match serde_json::from_str::<Done>(&line?) {
            Ok(d) => done.push(d),
            Err(_) => break,
        }
    }
    Ok(Some((fingerprint, done)))
}

/// Deletes everything in `dir` but the file `keep`.
fn clear_except(dir: &Path, keep: &str) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        if entry.file_name() == keep {
            continue;
        }
        let path = entry.path();
        let removed = if entry.file_type()?.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        removed.with_context(|| format!("cannot remove {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_the_part_and_the_field() {
        let then = Fingerprint::default().with("method", serde_json::json!({"name": "rtn", "version": "0.1.0"})).with("kvant", "0.1.0");
        let now = Fingerprint::default().with("method", serde_json::json!({"name": "rtn", "version": "0.2.0"})).with("kvant", "0.1.0");
        assert_eq!(now.differences(&then), ["method (version: \"0.1.0\" -> \"0.2.0\")"]);
        assert!(then.differences(&then).is_empty());
    }

    #[test]
    fn partial_dir_sits_beside_the_output() {
        assert_eq!(partial_dir(Path::new("/a/b/out")), Path::new("/a/b/.out.kvant-partial"));
    }
}
