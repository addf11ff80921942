//! Writing a conversion's files crash-safely: each as `NAME.partial`, synced, then renamed, with
//! complete files from an interrupted run kept; progress counted as it goes.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::plan::Plan;
use super::{ConvertEvent, ConvertProgress, PARTIAL};
use crate::error::{Error, Result};
use crate::format::layout::{
    self, FORMAT_VERSION, FileEntry, FileHasher, MANIFEST, Manifest, SOURCE,
};

/// Writes output files crash-safely and keeps the counts for progress and the manifest.
pub(super) struct Writer<'p> {
    out: PathBuf,
    files: BTreeMap<String, FileEntry>,
    counts: Counts,
    progress: &'p mut dyn FnMut(&ConvertProgress),
}

#[derive(Clone, Copy, Default)]
struct Counts {
    files_done: usize,
    files_total: usize,
    tensors_done: usize,
    tensors_total: usize,
    bytes_done: u64,
    bytes_total: u64,
}

impl Counts {
    fn report(&self, file: &str, event: ConvertEvent, progress: &mut dyn FnMut(&ConvertProgress)) {
        progress(&ConvertProgress {
            file,
            event,
            files_done: self.files_done,
            files_total: self.files_total,
            tensors_done: self.tensors_done,
            tensors_total: self.tensors_total,
            bytes_done: self.bytes_done,
            bytes_total: self.bytes_total,
        });
    }
}

impl<'p> Writer<'p> {
    pub(super) fn new(
        out: &Path,
        plan: &Plan,
        progress: &'p mut dyn FnMut(&ConvertProgress),
    ) -> Self {
        let experts = (plan.config.moe_layers().count() * plan.config.num_experts) as u64;
        let copied: u64 = plan.copies.iter().map(|&(_, bytes)| bytes).sum();
        let counts = Counts {
            files_total: 1 + plan.copies.len() + plan.base.len() + experts as usize,
            tensors_total: plan.tensors_total,
            bytes_total: plan.source_json.len() as u64
                + copied
                + plan.base.iter().map(|b| b.file_bytes).sum::<u64>()
                + experts * plan.expert.file_bytes,
            ..Counts::default()
        };
        Self {
            out: out.to_path_buf(),
            files: BTreeMap::new(),
            counts,
            progress,
        }
    }

    /// Claims `out` for this source: a new or empty directory gets `source.json`; one that has
    /// it already must have been started from the same checkpoint.
    pub(super) fn start(&mut self, source_json: &[u8]) -> Result<()> {
        let out = &self.out;
        if out.exists() && !out.is_dir() {
            return Err(Error::config(out, "exists and is not a directory"));
        }
        fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let source = out.join(SOURCE);
        if source.exists() {
            let existing = fs::read(&source).map_err(|e| Error::io(&source, e))?;
            if existing != source_json {
                return Err(Error::config(
                    out,
                    format!(
                        "holds a conversion of a different checkpoint ({SOURCE} differs); \
                         remove it or choose another output directory"
                    ),
                ));
            }
        } else {
            let leftover = format!("{SOURCE}{PARTIAL}");
            for entry in fs::read_dir(out).map_err(|e| Error::io(out, e))? {
                let entry = entry.map_err(|e| Error::io(out, e))?;
                if entry.file_name().to_str() != Some(leftover.as_str()) {
                    return Err(Error::config(
                        out,
                        format!(
                            "is not empty and holds no conversion in progress (no {SOURCE}); \
                             remove it or choose another output directory"
                        ),
                    ));
                }
            }
        }
        self.produce(SOURCE, source_json.len() as u64, 0, |sink| {
            sink.write(source_json)
        })?;
        for dir in ["base_model", "experts"] {
            let dir = self.out.join(dir);
            fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        sync_dir(&self.out)
    }

    /// Makes `rel` exist complete: kept if already there with the expected length, else written
    /// by `write` to `rel.partial`, synced and renamed.
    pub(super) fn produce(
        &mut self,
        rel: &str,
        expected: u64,
        tensors: usize,
        write: impl FnOnce(&mut Sink) -> Result<()>,
    ) -> Result<()> {
        let path = self.out.join(rel);
        let start = self.counts.bytes_done;
        let kept = match fs::metadata(&path) {
            Ok(meta) if meta.is_file() && meta.len() == expected => true,
            // A file of the wrong length under a final name cannot come from an interrupted
            // conversion; it is replaced.
            Ok(_) => {
                fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io(&path, e)),
        };
        let entry = if kept {
            let (counts, progress) = (&mut self.counts, &mut *self.progress);
            let entry = layout::hash_file(&path, |n| {
                counts.bytes_done += n;
                counts.report(rel, ConvertEvent::Rehash, progress);
            })?;
            self.counts.tensors_done += tensors;
            entry
        } else {
            let partial = self.out.join(format!("{rel}{PARTIAL}"));
            let file = File::create(&partial).map_err(|e| Error::io(&partial, e))?;
            let mut sink = Sink {
                out: BufWriter::with_capacity(1 << 20, file),
                hasher: FileHasher::default(),
                path: &partial,
                rel,
                counts: &mut self.counts,
                progress: &mut *self.progress,
            };
            write(&mut sink)?;
            let entry = sink.hasher.finish();
            let file = sink
                .out
                .into_inner()
                .map_err(|e| Error::io(&partial, e.into_error()))?;
            if entry.bytes != expected {
                return Err(Error::config(
                    &partial,
                    format!(
                        "wrote {} bytes where the layout needs {expected}",
                        entry.bytes
                    ),
                ));
            }
            file.sync_all().map_err(|e| Error::io(&partial, e))?;
            drop(file);
            fs::rename(&partial, &path).map_err(|e| Error::io(&path, e))?;
            sync_dir(path.parent().unwrap_or(&self.out))?;
            entry
        };
        self.counts.bytes_done = start + expected;
        self.counts.files_done += 1;
        let event = if kept {
            ConvertEvent::Kept
        } else {
            ConvertEvent::Written
        };
        self.counts.report(rel, event, self.progress);
        self.files.insert(rel.to_string(), entry);
        Ok(())
    }

    /// Removes leftover partial files, then writes the manifest last (unless an identical one is
    /// already in place).
    pub(super) fn finish(self, plan: &Plan) -> Result<Manifest> {
        for dir in [
            self.out.clone(),
            self.out.join("base_model"),
            self.out.join("experts"),
        ] {
            for entry in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
                let path = entry.map_err(|e| Error::io(&dir, e))?.path();
                if path.extension().is_some_and(|ext| ext == &PARTIAL[1..]) {
                    fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                }
            }
        }
        let manifest = Manifest {
            format: "odmoe".into(),
            format_version: FORMAT_VERSION,
            architecture: plan.config.clone(),
            tokenizer: plan
                .copies
                .iter()
                .map(|&(name, _)| name)
                .chain(plan.generated.iter().map(|&(name, _)| name))
                .any(|name| name == "tokenizer.json")
                .then(|| "tokenizer.json".to_string()),
            base_files: plan.base.iter().map(|b| b.rel.to_string()).collect(),
            expert: plan.expert.clone(),
            files: self.files,
        };
        manifest
            .check()
            .map_err(|m| Error::config(self.out.join(MANIFEST), m))?;
        let text = manifest.to_json();
        let path = self.out.join(MANIFEST);
        if fs::read(&path).ok().as_deref() != Some(text.as_bytes()) {
            let partial = self.out.join(format!("{MANIFEST}{PARTIAL}"));
            let mut file = File::create(&partial).map_err(|e| Error::io(&partial, e))?;
            file.write_all(text.as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| Error::io(&partial, e))?;
            drop(file);
            fs::rename(&partial, &path).map_err(|e| Error::io(&path, e))?;
            sync_dir(&self.out)?;
        }
        Ok(manifest)
    }
}

/// Makes a rename durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// The open `.partial` file a producer writes into, hashing as it goes.
pub(super) struct Sink<'a> {
    out: BufWriter<File>,
    hasher: FileHasher,
    path: &'a Path,
    rel: &'a str,
    counts: &'a mut Counts,
    progress: &'a mut dyn FnMut(&ConvertProgress),
}

impl Sink<'_> {
    pub(super) fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(self.path, e))?;
        self.hasher.update(bytes);
        Ok(())
    }

    pub(super) fn zeros(&mut self, n: u64) -> Result<()> {
        const ZEROS: [u8; 4096] = [0; 4096];
        let mut left = n;
        while left > 0 {
            let chunk = left.min(ZEROS.len() as u64) as usize;
            self.write(&ZEROS[..chunk])?;
            left -= chunk as u64;
        }
        Ok(())
    }

    pub(super) fn tensor_done(&mut self, bytes: u64) {
        self.counts.tensors_done += 1;
        self.counts.bytes_done += bytes;
        self.counts
            .report(self.rel, ConvertEvent::Tensor, self.progress);
    }
}
