//! Writing a Hugging Face checkpoint, streaming and crash-safe.
//!
//! The full list of output tensors is known before any data exists, so shards and headers are
//! laid out at creation and every tensor goes straight to its final offset, in any order, with
//! positioned writes. Everything lands in a temporary folder beside the output, which is renamed
//! into place only once complete and synced: an interrupted run never leaves an output that
//! looks finished.
//!
//! A tensor planned with a variable length (`TensorSpec::variable_length`, known only once a
//! plugin quantized it) gets room for its bound at the end of its shard, after every fixed-size
//! tensor. `finish` moves such tensors down over the unused room, rewrites the header with their
//! real shapes (padded with spaces to its planned size, which safetensors allows) and truncates
//! the file, so the output has no gaps, as safetensors requires.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};

use anyhow::{bail, ensure, Context, Result};
use kvant_plugin_api::{Tensor, TensorSpec, TensorView};
use serde_json::Value;

use super::header;
use super::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};

/// Default shard size limit: transformers' `max_shard_size="5GB"` (decimal gigabytes).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// How a [`CheckpointWriter`] lays out and installs its output.
#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// Shards are filled in plan order up to this many tensor bytes; a tensor larger than the
    /// limit gets a shard of its own.
    pub max_shard_bytes: u64,
    /// Replace an existing output folder (only at the very end, once the new one is complete).
    pub force: bool,
    /// Paths the output must never replace or contain, typically the input checkpoint's folder.
    pub protected_paths: Vec<PathBuf>,
    /// Fault injection for tests: writes fail, like on a full disk, once this many bytes of
    /// shard data, headers, index and config have been written.
    pub fail_after_bytes: Option<u64>,
    /// Resume hook (`kvant quantize`, see `crate::resume`): a temporary folder that outlives
    /// an interruption, instead of a per-process one removed on drop.
    pub resumable: Option<Resumable>,
}

/// The temporary folder of a resumable output and what an earlier run left in it.
#[derive(Clone, Debug, Default)]
pub struct Resumable {
    /// The folder, at a name a later run can find. Created if missing; kept when the writer is
    /// dropped unfinished.
    pub dir: PathBuf,
    /// Tensors an earlier run wrote and synced there. When not empty, the shards are reopened
    /// (and must have exactly the planned headers and sizes) instead of recreated.
    pub written: HashSet<String>,
    /// Byte lengths of the variable-length tensors among `written`.
    pub lengths: HashMap<String, u64>,
    /// Files of `dir` that are not output (journal, lock): deleted before the folder is installed.
    pub scratch: Vec<String>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            force: false,
            protected_paths: Vec::new(),
            fail_after_bytes: None,
            resumable: None,
        }
    }
}

/// Largest positioned write of [`CheckpointWriter::write_in_pieces`].
const PIECE: usize = 16 << 20;

const PENDING: u8 = 0;
const WRITING: u8 = 1;
const DONE: u8 = 2;

/// Distinguishes the temporary folders (new and set-aside outputs) of writers in one process.
static NEXT_TEMP_ID: AtomicUsize = AtomicUsize::new(0);

struct ShardFile {
    file_name: String,
    path: PathBuf,
    file: File,
    /// Bytes of the length field and header planned at creation.
    prefix_len: usize,
    /// Its slots, in file order (indices into `slots`).
    slots: std::ops::Range<usize>,
}

/// Where one planned tensor goes and whether it has been written.
struct Slot {
    spec: TensorSpec,
    shard: usize,
    file_offset: u64,
    state: AtomicU8,
    /// Bytes written: the planned size, or for a variable-length tensor what it turned out to be.
    len: AtomicU64,
}

impl Slot {
    /// The tensor's spec with its real shape once a variable length is settled.
    fn settled_spec(&self) -> TensorSpec {
        let len = self.len.load(Ordering::Acquire) as usize;
        match self.spec.variable_length {
            true => TensorSpec::new(self.spec.name.clone(), self.spec.dtype, [len / self.spec.dtype.size()]),
            false => self.spec.clone(),
        }
    }
}

/// A checkpoint being written. Create it with the complete output plan, [`write`] every tensor
/// (from several threads if wished), then [`finish`]. Dropped unfinished, it removes its
/// temporary folder and leaves nothing behind.
///
/// [`write`]: CheckpointWriter::write
/// [`finish`]: CheckpointWriter::finish
pub struct CheckpointWriter {
    out_dir: PathBuf,
    temp_dir: PathBuf,
    force: bool,
    protected_paths: Vec<PathBuf>,
    shards: Vec<ShardFile>,
    slots: Vec<Slot>,
    by_name: HashMap<String, usize>,
    bytes_left: Option<AtomicU64>,
    installed: bool,
    /// A resumable output's folder stays when the writer is dropped unfinished.
    keep_temp: bool,
    scratch: Vec<String>,
}

impl CheckpointWriter {
    /// Plans the output for `specs` (full tensor names), creates the temporary folder beside
    /// `out_dir` and pre-sizes every shard with its header. Shards are filled in the order of
    /// `specs`; within a shard, wider dtypes are stored first so every tensor is aligned to its
    /// element size.
    ///
    /// Fails if `out_dir` exists and `options.force` is not set, or if it would replace a
    /// protected path.
    pub fn create(
        out_dir: impl AsRef<Path>,
        specs: Vec<TensorSpec>,
        options: WriterOptions,
    ) -> Result<CheckpointWriter> {
        let out_dir = out_dir.as_ref().to_path_buf();
        let Some(out_name) = out_dir.file_name().and_then(|n| n.to_str()) else {
            bail!("output path {} must name a folder", out_dir.display());
        };
        check_output_replaceable(&out_dir, options.force, &options.protected_paths)?;

        let mut seen = HashSet::new();
        for spec in &specs {
            if !seen.insert(spec.name.as_str()) {
                bail!(
                    "output plan for {} lists tensor `{}` twice",
                    out_dir.display(),
                    spec.name
                );
            }
            if header::checked_byte_len(spec).is_none() {
                bail!(
                    "output tensor `{}` has an impossibly large shape {:?}",
                    spec.name,
                    spec.shape
                );
            }
        }

        let parent = match out_dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("cannot create folder {}", parent.display()))?;
        let temp_dir = match &options.resumable {
            Some(r) => r.dir.clone(),
            None => parent.join(format!(
                ".{out_name}.kvant-tmp-{}-{}",
                std::process::id(),
                NEXT_TEMP_ID.fetch_add(1, Ordering::Relaxed)
            )),
        };
        let created = if options.resumable.is_some() {
            std::fs::create_dir_all(&temp_dir)
        } else {
            std::fs::create_dir(&temp_dir)
        };
        created.with_context(|| {
            format!(
                "cannot create temporary folder {} (if a crashed run left it, delete it)",
                temp_dir.display()
            )
        })?;
        let resumable = options.resumable.unwrap_or_default();
        let reopen = !resumable.written.is_empty();

        // From here on, an early return drops the writer, which removes the temporary folder.
        let mut writer = CheckpointWriter {
            out_dir,
            temp_dir,
            force: options.force,
            protected_paths: options.protected_paths,
            shards: Vec::new(),
            slots: Vec::with_capacity(specs.len()),
            by_name: HashMap::with_capacity(specs.len()),
            bytes_left: options.fail_after_bytes.map(AtomicU64::new),
            installed: false,
            keep_temp: !resumable.dir.as_os_str().is_empty(),
            scratch: resumable.scratch,
        };
        let groups = plan_shards(specs, options.max_shard_bytes);
        let shard_count = groups.len();
        for (shard, mut group) in groups.into_iter().enumerate() {
            // Widest elements first keeps every tensor aligned to its element size, so F32
            // views of a memory map need no copy. Variable lengths go last: only they move
            // at `finish`.
            group.sort_by_key(|spec| (spec.variable_length, std::cmp::Reverse(spec.dtype.size())));
            writer.add_shard(shard, shard_count, group, reopen)?;
        }
        for name in &resumable.written {
            let slot = writer.slot(name)?;
            if slot.spec.variable_length {
                let len = resumable.lengths.get(name).copied().with_context(|| {
                    format!("the journal of {} does not give the length of `{name}`; cannot resume", writer.temp_dir.display())
                })?;
                writer.settle_len(slot, len as usize)?;
            }
            slot.state.store(DONE, Ordering::Release);
        }
        Ok(writer)
    }

    fn add_shard(
        &mut self,
        shard: usize,
        shard_count: usize,
        specs: Vec<TensorSpec>,
        reopen: bool,
    ) -> Result<()> {
        let file_name = if shard_count == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", shard + 1, shard_count)
        };
        let path = self.temp_dir.join(&file_name);
        let prefix = header::serialize(&specs);
        let data_len: u64 = specs.iter().map(|s| s.byte_len() as u64).sum();
        let file_len = prefix.len() as u64 + data_len;
        let file = if reopen {
            reopen_shard(&path, &prefix, file_len)?
        } else {
            // Readable too: `finish` moves variable-length tensors within the file.
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            file.set_len(file_len)
                .with_context(|| format!("cannot pre-size {} to {file_len} bytes", path.display()))?;
            self.write_all_at(&file, &path, 0, &prefix)?;
            file
        };

        let mut file_offset = prefix.len() as u64;
        let first = self.slots.len();
        for spec in specs {
            let len = spec.byte_len() as u64;
            self.by_name.insert(spec.name.clone(), self.slots.len());
            self.slots.push(Slot {
                spec,
                shard,
                file_offset,
                state: AtomicU8::new(PENDING),
                len: AtomicU64::new(len),
            });
            file_offset += len;
        }
        self.shards.push(ShardFile {
            file_name,
            path,
            file,
            prefix_len: prefix.len(),
            slots: first..self.slots.len(),
        });
        Ok(())
    }

    /// The temporary folder the output is written into.
    pub fn temp_dir(&self) -> &Path {
        &self.temp_dir
    }

    /// Flushes the data written so far to disk (every shard file), so that a journal may
    /// record it as durable.
    pub fn sync_data(&self) -> Result<()> {
        for shard in &self.shards {
            shard
                .file
                .sync_data()
                .with_context(|| format!("cannot sync {} to disk", shard.path.display()))?;
        }
        Ok(())
    }

    /// The shard file names, in order (`model.safetensors`, or `model-0000i-of-0000N.safetensors`).
    pub fn shard_file_names(&self) -> Vec<&str> {
        self.shards.iter().map(|s| s.file_name.as_str()).collect()
    }

    /// Writes the data of planned tensor `name` at its place. Fails if the name is not in the
    /// plan, the length is not the planned one (or, for a variable length, over the bound or
    /// not whole elements), the tensor was already written, or the disk refuses the write.
    pub fn write(&self, name: &str, data: &[u8]) -> Result<()> {
        self.write_in_pieces(name, data, |_| {})
    }

    /// The byte length of a written variable-length tensor (what a journal must keep to resume);
    /// `None` for fixed-size or unwritten tensors.
    pub fn settled_len(&self, name: &str) -> Option<u64> {
        let slot = self.slot(name).ok()?;
        (slot.spec.variable_length && slot.state.load(Ordering::Acquire) == DONE).then(|| slot.len.load(Ordering::Acquire))
    }

    /// Tensor bytes the output holds: planned sizes, with variable lengths as written so far
    /// (their bounds until then).
    pub fn data_bytes(&self) -> u64 {
        self.slots.iter().map(|s| s.len.load(Ordering::Acquire)).sum()
    }

    fn settle_len(&self, slot: &Slot, len: usize) -> Result<()> {
        let size = slot.spec.dtype.size();
        if len > slot.spec.byte_len() || len % size != 0 {
            bail!(
                "tensor `{}` has {len} bytes, but the output plan allows whole {} elements up to {} bytes",
                slot.spec.name,
                slot.spec.dtype,
                slot.spec.byte_len()
            );
        }
        slot.len.store(len as u64, Ordering::Release);
        Ok(())
    }

    /// [`write`](Self::write) in positioned writes of at most 16 MiB, calling
    /// `after_piece` with each piece once it is written: a caller streaming from a memory map
    /// can release the pages it will not read again, so that a large tensor is never resident whole.
    pub fn write_in_pieces(&self, name: &str, data: &[u8], mut after_piece: impl FnMut(&[u8])) -> Result<()> {
        let slot = self.slot(name)?;
        if !slot.spec.variable_length && data.len() != slot.spec.byte_len() {
            bail!(
                "tensor `{name}` has {} bytes, but the output plan says {} {:?} = {} bytes",
                data.len(),
                slot.spec.dtype,
                slot.spec.shape,
                slot.spec.byte_len()
            );
        }
        if slot
            .state
            .compare_exchange(PENDING, WRITING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            bail!("tensor `{name}` was written twice; each output tensor must be written once");
        }
        if slot.spec.variable_length {
            if let Err(e) = self.settle_len(slot, data.len()) {
                slot.state.store(PENDING, Ordering::Release);
                return Err(e);
            }
        }
        let shard = &self.shards[slot.shard];
        let written = data.chunks(PIECE).enumerate().try_for_each(|(i, piece)| {
            let offset = slot.file_offset + (i * PIECE) as u64;
            self.write_all_at(&shard.file, &shard.path, offset, piece)?;
            start_writeback(&shard.file, offset, piece.len());
            after_piece(piece);
            Ok::<_, anyhow::Error>(())
        });
        match written {
            Ok(()) => {
                slot.state.store(DONE, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                slot.state.store(PENDING, Ordering::Release);
                Err(e.context(format!(
                    "cannot save tensor `{name}`; the output {} was not created",
                    self.out_dir.display()
                )))
            }
        }
    }

    /// Like [`write`](Self::write), and also checks that the view's dtype and shape are the
    /// planned ones. `full_name` is the output name; the view's own name is not used.
    pub fn write_view(&self, full_name: &str, view: &TensorView<'_>) -> Result<()> {
        self.write_view_in_pieces(full_name, view, |_| {})
    }

    /// [`write_view`](Self::write_view) through [`write_in_pieces`](Self::write_in_pieces).
    pub fn write_view_in_pieces(&self, full_name: &str, view: &TensorView<'_>, after_piece: impl FnMut(&[u8])) -> Result<()> {
        let planned = &self.slot(full_name)?.spec;
        if !planned.admits(view.dtype, view.shape) {
            bail!(
                "tensor `{full_name}` is {} {:?}, but the output plan says {} {:?}",
                view.dtype,
                view.shape,
                planned.dtype,
                planned.shape
            );
        }
        self.write_in_pieces(full_name, view.data, after_piece)
    }

    fn slot(&self, name: &str) -> Result<&Slot> {
        self.by_name
            .get(name)
            .map(|&i| &self.slots[i])
            .with_context(|| {
                format!(
                "tensor `{name}` is not in the output plan of {}; the plan and the data disagree",
                self.out_dir.display()
            )
            })
    }

    /// Completes the checkpoint: checks every planned tensor was written, writes the index (when
    /// sharded) and `config.json` (indent 2, key order kept), copies `files_to_copy` by file
    /// name, syncs everything to disk, then renames the temporary folder into place, replacing
    /// an existing output only now and only with `force`.
    pub fn finish(mut self, config: &Value, files_to_copy: &[PathBuf]) -> Result<()> {
        let missing: Vec<&str> = self
            .slots
            .iter()
            .filter(|s| s.state.load(Ordering::Acquire) != DONE)
            .map(|s| s.spec.name.as_str())
            .collect();
        if !missing.is_empty() {
            let shown = missing
                .iter()
                .take(10)
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ");
            let more = missing.len().saturating_sub(10);
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            bail!(
                "{} of {} output tensors were never written ({shown}{more}); {} was not created",
                missing.len(),
                self.slots.len(),
                self.out_dir.display()
            );
        }
        if !config.is_object() {
            bail!(
                "the config to save in {} must be a JSON object",
                self.out_dir.display()
            );
        }

        for shard in &self.shards {
            self.settle_variable_lengths(shard)?;
        }
        for shard in &self.shards {
            shard
                .file
                .sync_all()
                .with_context(|| format!("cannot sync {} to disk", shard.path.display()))?;
        }
        if self.shards.len() > 1 {
            let index = self.index_json();
            self.write_new_file(INDEX_FILE, &index)?;
        }
        let mut config_text =
            serde_json::to_string_pretty(config).context("cannot serialize config.json")?;
        config_text.push('\n');
        self.write_new_file(CONFIG_FILE, config_text.as_bytes())?;
        self.copy_files(files_to_copy)?;
        for name in &self.scratch {
            let path = self.temp_dir.join(name);
            std::fs::remove_file(&path)
                .or_else(|e| if e.kind() == io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
        sync_dir(&self.temp_dir)?;

        self.install()?;
        self.installed = true;
        Ok(())
    }

    /// Moves the shard's variable-length tensors down over the room their bounds left unused,
    /// rewrites its header with their real shapes and cuts the file after the last byte.
    /// (Room is kept at the end of the shard, so no fixed-size tensor moves.)
    fn settle_variable_lengths(&self, shard: &ShardFile) -> Result<()> {
        let slots = &self.slots[shard.slots.clone()];
        if !slots.iter().any(|s| s.spec.variable_length) {
            return Ok(());
        }
        let mut cursor = shard.prefix_len as u64;
        for slot in slots {
            let len = slot.len.load(Ordering::Acquire);
            if slot.file_offset != cursor {
                // Each tensor moves down by at most the room left by those before it, never onto
                // bytes of a later tensor not yet moved.
                let mut data = vec![0; len as usize];
                positioned_read(&shard.file, &mut data, slot.file_offset)
                    .with_context(|| format!("cannot read back `{}` from {}", slot.spec.name, shard.path.display()))?;
                self.write_all_at(&shard.file, &shard.path, cursor, &data)?;
            }
            cursor += len;
        }
        let specs: Vec<TensorSpec> = slots.iter().map(Slot::settled_spec).collect();
        let mut prefix = header::serialize(&specs);
        // The real shapes and offsets have no more digits than the bounds the header was planned
        // with; spaces after the JSON keep its planned size.
        let json_len = shard.prefix_len - 8;
        if prefix.len() > shard.prefix_len {
            bail!("the settled header of {} outgrew its planned {} bytes", shard.path.display(), shard.prefix_len);
        }
        prefix.resize(shard.prefix_len, b' ');
        prefix[..8].copy_from_slice(&(json_len as u64).to_le_bytes());
        self.write_all_at(&shard.file, &shard.path, 0, &prefix)?;
        shard
            .file
            .set_len(cursor)
            .with_context(|| format!("cannot cut {} to {cursor} bytes", shard.path.display()))
    }

    /// `model.safetensors.index.json` as transformers writes it: sorted keys, indent 2.
    fn index_json(&self) -> Vec<u8> {
        let weight_map: BTreeMap<&str, &str> = self
            .slots
            .iter()
            .map(|s| {
                (
                    s.spec.name.as_str(),
                    self.shards[s.shard].file_name.as_str(),
                )
            })
            .collect();
        let total_size = self.data_bytes();
        let index = serde_json::json!({
            "metadata": { "total_size": total_size },
            "weight_map": weight_map,
        });
        let mut text = serde_json::to_vec_pretty(&index).expect("a JSON map always serializes");
        text.push(b'\n');
        text
    }

    fn copy_files(&self, files: &[PathBuf]) -> Result<()> {
        let mut taken: HashSet<String> = self.shards.iter().map(|s| s.file_name.clone()).collect();
        taken.insert(CONFIG_FILE.into());
        taken.insert(INDEX_FILE.into());
        for source in files {
            let name = source
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| {
                    format!(
                        "cannot copy {}: it has no usable file name",
                        source.display()
                    )
                })?;
            if !taken.insert(name.to_string()) {
                bail!(
                    "cannot copy {}: the output already has a file named `{name}` (written or copied)",
                    source.display()
                );
            }
            let target = self.temp_dir.join(name);
            std::fs::copy(source, &target).with_context(|| {
                format!("cannot copy {} to {}", source.display(), target.display())
            })?;
            File::open(&target)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("cannot sync {} to disk", target.display()))?;
        }
        Ok(())
    }

    /// Adds a small file to the output (e.g. a method's `quantize_config.json`), written when
    /// called and installed with the rest. `name` must be a plain file name that is not one of
    /// the checkpoint's own files.
    pub fn write_file(&self, name: &str, contents: &[u8]) -> Result<()> {
        let plain = !name.is_empty() && Path::new(name).file_name().is_some_and(|f| f == name) && name != "." && name != "..";
        ensure!(plain, "cannot add `{name}` to {}: not a plain file name", self.out_dir.display());
        let own = name == CONFIG_FILE || name == INDEX_FILE || self.shards.iter().any(|s| s.path.file_name().is_some_and(|f| f == name));
        ensure!(!own, "cannot add `{name}` to {}: the checkpoint writes that file itself", self.out_dir.display());
        self.write_new_file(name, contents)
    }

    fn write_new_file(&self, name: &str, contents: &[u8]) -> Result<()> {
        let path = self.temp_dir.join(name);
        let file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        self.write_all_at(&file, &path, 0, contents)?;
        file.sync_all()
            .with_context(|| format!("cannot sync {} to disk", path.display()))
    }

    /// Moves the complete temporary folder to the output path. An existing output is first
    /// renamed aside, restored if the swap fails, and deleted only once the new one is in place.
    /// (A crash between the two renames leaves the old output in its set-aside folder.)
    fn install(&self) -> Result<()> {
        check_output_replaceable(&self.out_dir, self.force, &self.protected_paths)?;
        let parent = self
            .temp_dir
            .parent()
            .expect("the temporary folder has a parent");
        let old = if self.out_dir.symlink_metadata().is_ok() {
            let name = self
                .out_dir
                .file_name()
                .expect("checked at create")
                .to_string_lossy();
            let aside = parent.join(format!(
                ".{name}.kvant-old-{}-{}",
                std::process::id(),
                NEXT_TEMP_ID.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::rename(&self.out_dir, &aside).with_context(|| {
                format!(
                    "cannot move the existing {} aside to replace it",
                    self.out_dir.display()
                )
            })?;
            Some(aside)
        } else {
            None
        };
        if let Err(e) = std::fs::rename(&self.temp_dir, &self.out_dir) {
            if let Some(old) = &old {
                if let Err(restore) = std::fs::rename(old, &self.out_dir) {
                    log::error!(
                        "could not restore the previous output from {}: {restore}",
                        old.display()
                    );
                }
            }
            return Err(e).with_context(|| {
                format!(
                    "cannot rename {} to {}",
                    self.temp_dir.display(),
                    self.out_dir.display()
                )
            });
        }
        sync_dir(parent)?;
        if let Some(old) = old {
            let removed = if old.is_dir() {
                std::fs::remove_dir_all(&old)
            } else {
                std::fs::remove_file(&old)
            };
            if let Err(e) = removed {
                log::warn!(
                    "new output is in place, but the old one at {} could not be deleted: {e}",
                    old.display()
                );
            }
        }
        Ok(())
    }

    /// Positioned write of all of `data`, drawing on the fault-injection budget when one is set.
    fn write_all_at(&self, file: &File, path: &Path, offset: u64, data: &[u8]) -> Result<()> {
        let allowed = match &self.bytes_left {
            None => data.len(),
            Some(left) => {
                let before = left
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                        Some(l.saturating_sub(data.len() as u64))
                    })
                    .expect("the update always succeeds");
                data.len().min(before as usize)
            }
        };
        positioned_write(file, &data[..allowed], offset)
            .and_then(|()| {
                if allowed < data.len() {
                    Err(io::Error::other(
                        "no space left on device (simulated: fail_after_bytes reached)",
                    ))
                } else {
                    Ok(())
                }
            })
            .with_context(|| {
                format!(
                    "cannot write {} bytes at offset {offset} of {}",
                    data.len(),
                    path.display()
                )
            })
    }
}

impl std::fmt::Debug for CheckpointWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointWriter")
            .field("out_dir", &self.out_dir)
            .field("temp_dir", &self.temp_dir)
            .field("shards", &self.shard_file_names())
            .field("tensors", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if !self.installed && !self.keep_temp {
            if let Err(e) = std::fs::remove_dir_all(&self.temp_dir) {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!(
                        "cannot remove temporary folder {}: {e}",
                        self.temp_dir.display()
                    );
                }
            }
        }
    }
}

/// Opens a shard an interrupted run created, checking it has exactly the planned header and size.
fn reopen_shard(path: &Path, prefix: &[u8], file_len: u64) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot reopen {} to resume", path.display()))?;
    let len = file.metadata().with_context(|| format!("cannot read {}", path.display()))?.len();
    let mut head = vec![0; prefix.len()];
    if len == file_len {
        io::Read::read_exact(&mut &file, &mut head).with_context(|| format!("cannot read {}", path.display()))?;
    }
    if len != file_len || head != prefix {
        bail!(
            "{} does not have the planned layout ({len} bytes, expected {file_len}); cannot resume into it",
            path.display()
        );
    }
    Ok(file)
}

/// Groups specs into shards greedily in plan order, as transformers does: a tensor that would
/// push a non-empty shard past the limit starts the next one.
fn plan_shards(specs: Vec<TensorSpec>, max_shard_bytes: u64) -> Vec<Vec<TensorSpec>> {
    let mut shards: Vec<Vec<TensorSpec>> = vec![Vec::new()];
    let mut current_bytes = 0u64;
    for spec in specs {
        let len = spec.byte_len() as u64;
        let current = shards.last_mut().expect("never empty");
        if !current.is_empty() && current_bytes + len > max_shard_bytes {
            shards.push(Vec::new());
            current_bytes = 0;
        }
        current_bytes += len;
        shards.last_mut().expect("never empty").push(spec);
    }
    shards
}

/// Refuses an existing output without `force`, and any output that is or contains a protected path.
fn check_output_replaceable(
    out_dir: &Path,
    force: bool,
    protected_paths: &[PathBuf],
) -> Result<()> {
    if out_dir.symlink_metadata().is_err() {
        return Ok(());
    }
    if !force {
        bail!(
            "output {} already exists; choose another output folder, or pass --force to replace it",
            out_dir.display()
        );
    }
    let real_out = out_dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", out_dir.display()))?;
    for protected in protected_paths {
        if protected
            .canonicalize()
            .is_ok_and(|p| p.starts_with(&real_out))
        {
            bail!(
                "refusing to replace {}: it holds the input {}; write the output somewhere else",
                out_dir.display(),
                protected.display()
            );
        }
    }
    Ok(())
}

#[cfg(unix)]
fn positioned_write(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, data, offset)
}

/// Writes of at least this many bytes are sent on to the disk at once (see [`start_writeback`]).
const WRITEBACK_MIN: usize = 1 << 20;

/// Starts writing a range just written to disk without waiting for it, so that the sync before
/// the output is installed (and the journal's) finds most of the output already there instead
/// of waiting for all of it at the end. Linux only; small writes are left to that sync.
fn start_writeback(file: &File, offset: u64, len: usize) {
    #[cfg(target_os = "linux")]
    if len >= WRITEBACK_MIN {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for the life of `file`; the call only schedules I/O.
        // Its errors are ignored on purpose: the sync that follows reports any that matter.
        unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

#[cfg(unix)]
fn positioned_read(file: &File, data: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, data, offset)
}

#[cfg(windows)]
fn positioned_read(file: &File, mut data: &mut [u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !data.is_empty() {
        let n = file.seek_read(data, offset)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "failed to fill whole buffer"));
        }
        data = &mut data[n..];
        offset += n as u64;
    }
    Ok(())
}

#[cfg(windows)]
fn positioned_write(file: &File, mut data: &[u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !data.is_empty() {
        let n = file.seek_write(data, offset)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "failed to write whole buffer",
            ));
        }
        data = &data[n..];
        offset += n as u64;
    }
    Ok(())
}

/// Makes a folder's entries (new files, renames) durable.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync folder {} to disk", dir.display()))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Saves `tensors` (named with their full names) and `config` as a new checkpoint in `dir`,
/// which must not exist yet. A convenience over [`CheckpointWriter`] for tests and tools.
pub fn save_dense(dir: impl AsRef<Path>, tensors: &[Tensor], config: &Value) -> Result<()> {
    let specs = tensors.iter().map(Tensor::spec).collect();
    let writer = CheckpointWriter::create(dir, specs, WriterOptions::default())?;
    for tensor in tensors {
        writer.write_view(&tensor.name, &tensor.view())?;
    }
    writer.finish(config, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvant_plugin_api::DType;

    fn spec(name: &str, bytes: usize) -> TensorSpec {
        TensorSpec::new(name, DType::U8, [bytes])
    }

    #[test]
    fn shards_fill_greedily_and_oversized_tensors_stand_alone() {
        let specs = vec![
            spec("a", 4),
            spec("b", 4),
            spec("c", 3),
            spec("big", 20),
            spec("d", 1),
        ];
        let names: Vec<Vec<String>> = plan_shards(specs, 10)
            .into_iter()
            .map(|g| g.into_iter().map(|s| s.name).collect())
            .collect();
        assert_eq!(names, [vec!["a", "b"], vec!["c"], vec!["big"], vec!["d"]]);
    }

    #[test]
    fn empty_plan_is_one_shard() {
        assert_eq!(plan_shards(Vec::new(), 10).len(), 1);
    }
}
