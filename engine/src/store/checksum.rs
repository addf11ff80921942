//! Expert checksums, checked on every expert read before the bytes become weights, so that
//! nothing corrupt ever reaches the model.
//!
//! Each source reads an expert as a few byte ranges: one whole file in an odmoe layout, three
//! tensor slices in a GGUF file or a Hugging Face checkpoint (six for MXFP4 checkpoints, whose
//! blocks and scales lie apart). [`ExpertChecksums`] holds the
//! xxh3-64 of every such range, by layer, expert and range in read order. They come from:
//! - an odmoe layout's manifest, where `odmoe convert` records every file's xxh3-64;
//! - otherwise (a GGUF file or Hugging Face checkpoint read in place, a layout written before the
//!   manifest recorded them) an index computed by [`load_or_build`] on the first load, by reading
//!   every expert once, and kept beside the model when its folder is writable, else in the cache
//!   folder (`$XDG_CACHE_HOME/odmoe/checksums`, or `~/.cache/odmoe/checksums`). An index is keyed
//!   by the path, length and modification time of every file it covers and by the ranges read, so
//!   a changed file (or a change in what the store reads) gets a new one.
//!
//! xxh3 because it hashes at memory speed (tens of GB/s per core with SSE2 or NEON), a few percent
//! of the time the read of the same bytes takes, where SHA-256 would take longer than the read. It
//! guards against corruption (bit rot, torn or stray writes), not against tampering.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{Xxh3Default, xxh3_64};

use super::fetch;
use crate::error::{Error, Result};
use crate::format::layout::{parse_xxh3_hex, xxh3_hex};
use odmoe_config::format_bytes;

/// One byte range a source reads for an expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    /// Index into [`ReadPlan::files`].
    pub file: usize,
    pub offset: u64,
    pub len: u64,
}

/// Everything a source reads: `experts[layer][expert]` lists one expert's ranges in the order the
/// source checks them (layers without routed experts list none).
#[derive(Debug, Default)]
pub struct ReadPlan {
    pub files: Vec<PathBuf>,
    pub experts: Vec<Vec<Vec<ByteRange>>>,
}

/// Checksums by layer, expert and range.
type Sums = Vec<Vec<Vec<u64>>>;

/// The xxh3-64 of every range a source reads.
#[derive(Debug)]
pub struct ExpertChecksums {
    sums: Sums,
    /// Where they are recorded (a manifest, an index file), named when bytes do not match.
    origin: String,
}

impl ExpertChecksums {
    /// `sums[layer][expert][range]`, recorded in `origin`.
    pub fn new(sums: Sums, origin: impl Into<String>) -> Self {
        Self {
            sums,
            origin: origin.into(),
        }
    }

    /// Checks the bytes read for `range` (its index in read order) of an expert; the message
    /// says what differs.
    pub fn check(
        &self,
        layer: usize,
        expert: usize,
        range: usize,
        bytes: &[u8],
    ) -> std::result::Result<(), String> {
        let recorded = self
            .sums
            .get(layer)
            .and_then(|l| l.get(expert))
            .and_then(|ranges| ranges.get(range));
        let Some(&expected) = recorded else {
            return Err(format!(
                "{} records no checksum for range {range} of this expert",
                self.origin
            ));
        };
        let actual = xxh3_64(bytes);
        if actual == expected {
            return Ok(());
        }
        Err(format!(
            "checksum mismatch: xxh3_64 of the {} bytes read is {}, {} records {}: the bytes on \
             disk are corrupt or changed since, so the expert is refused",
            bytes.len(),
            xxh3_hex(actual),
            self.origin,
            xxh3_hex(expected)
        ))
    }
}

/// Checks a range's bytes while an index is computed, before they are trusted (a layout compares
/// its manifest's SHA-256 there); the message says what is wrong.
pub type Vouch<'a> = &'a (dyn Fn(&ByteRange, &[u8]) -> std::result::Result<(), String> + Sync);

const INDEX_FORMAT: &str = "odmoe-checksums";
const INDEX_VERSION: u32 = 1;
/// Ends the name of every index file, beside a model or in the cache folder.
pub const INDEX_SUFFIX: &str = ".odmoe-checksums";
/// Reads in flight while an index is computed: an SSD needs several to approach its rate, as the
/// store's I/O pool keeps them.
const INDEX_READERS: usize = 4;

/// An index file: the checksums of one model's expert ranges and the key they are valid for.
#[derive(Serialize, Deserialize)]
struct IndexFile {
    format: String,
    version: u32,
    /// The model file or directory, for people reading the file; the key decides validity.
    model: PathBuf,
    /// xxh3-64 of the path, length and modification time of every file covered and of every
    /// range read.
    key: String,
    /// xxh3-64 of `experts` itself, so that a damaged index is recomputed rather than trusted.
    sums_xxh3_64: String,
    /// `[layer][expert][range]`.
    experts: Vec<Vec<Vec<String>>>,
}

/// The checksums of every range of `plan` for the model at `model` (a GGUF file, or a directory):
/// from the index an earlier load kept when its key still matches, else computed now by reading
/// every range once (each seen by `vouch` first, when given) and kept for the next load.
pub fn load_or_build(
    model: &Path,
    plan: &ReadPlan,
    bypass_cache: bool,
    vouch: Option<Vouch>,
) -> Result<ExpertChecksums> {
    if plan.experts.iter().all(Vec::is_empty) {
        // A dense model: nothing is read on demand, and nothing is worth a file.
        return Ok(ExpertChecksums::new(
            vec![Vec::new(); plan.experts.len()],
            model.display().to_string(),
        ));
    }
    let model = fs::canonicalize(model).map_err(|e| Error::io(model, e))?;
    let key = xxh3_hex(index_key(plan)?);
    let locations = index_locations(&model);
    for location in &locations {
        if let Some(sums) = read_index(location, &key, plan) {
            return Ok(ExpertChecksums::new(sums, location.display().to_string()));
        }
    }
    // Each expert's distinct ranges (fused experts' gate and up share theirs).
    let total: u64 = plan
        .experts
        .iter()
        .flatten()
        .flat_map(|ranges| {
            ranges
                .iter()
                .enumerate()
                .filter(|&(i, range)| !ranges[..i].contains(range))
                .map(|(_, range)| range.len)
        })
        .sum();
    tracing::info!(
        "{}: computing the checksums of its experts: reading {} once, kept for later loads",
        model.display(),
        format_bytes(total)
    );
    let started = Instant::now();
    let sums = compute(plan, bypass_cache, vouch)?;
    let seconds = started.elapsed().as_secs_f64();
    let index = IndexFile {
        format: INDEX_FORMAT.into(),
        version: INDEX_VERSION,
        model: model.clone(),
        key,
        sums_xxh3_64: xxh3_hex(sums_hash(&sums)),
        experts: sums
            .iter()
            .map(|l| {
                l.iter()
                    .map(|e| e.iter().map(|&s| xxh3_hex(s)).collect())
                    .collect()
            })
            .collect(),
    };
    let text = serde_json::to_vec(&index).expect("an index always serialises");
    let kept = locations
        .iter()
        .find(|path| match write_atomically(path, &text) {
            Ok(()) => true,
            Err(error) => {
                tracing::debug!(
                    "cannot keep expert checksums in {}: {error}",
                    path.display()
                );
                false
            }
        });
    let origin = match kept {
        Some(path) => {
            tracing::info!(
                "{}: expert checksums computed in {seconds:.1} s ({}/s), kept in {}",
                model.display(),
                format_bytes((total as f64 / seconds.max(1e-9)) as u64),
                path.display()
            );
            path.display().to_string()
        }
        None => {
            tracing::warn!(
                "{}: expert checksums computed in {seconds:.1} s but could not be kept (neither \
                 beside the model nor in the cache folder is writable): the next load computes \
                 them again",
                model.display()
            );
            format!("the checksum index computed at load of {}", model.display())
        }
    };
    Ok(ExpertChecksums::new(sums, origin))
}

/// Where an index may be kept, in order of preference: beside the model (inside a model
/// directory), then in the cache folder under a name made from the model's path.
fn index_locations(model: &Path) -> Vec<PathBuf> {
    let name = model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let beside = if model.is_dir() {
        model.join(format!("experts{INDEX_SUFFIX}"))
    } else {
        model.with_file_name(format!("{name}{INDEX_SUFFIX}"))
    };
    let cached = cache_dir().map(|dir| {
        let path_hash = xxh3_64(model.as_os_str().as_bytes());
        dir.join(format!("{}-{name}{INDEX_SUFFIX}", xxh3_hex(path_hash)))
    });
    std::iter::once(beside).chain(cached).collect()
}

/// `$XDG_CACHE_HOME/odmoe/checksums`, or `~/.cache/odmoe/checksums`.
fn cache_dir() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = xdg.or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")));
    base.map(|b| b.join("odmoe").join("checksums"))
}

/// What an index is valid for: every covered file's path, length and modification time, and
/// every range read.
fn index_key(plan: &ReadPlan) -> Result<u64> {
    let mut hasher = Xxh3Default::new();
    let mut add = |n: u64| hasher.update(&n.to_le_bytes());
    for path in &plan.files {
        let canonical = fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
        let meta = fs::metadata(&canonical).map_err(|e| Error::io(path, e))?;
        let name = canonical.as_os_str().as_bytes();
        add(name.len() as u64);
        add(xxh3_64(name));
        add(meta.len());
        add(meta.mtime() as u64);
        add(meta.mtime_nsec() as u64);
    }
    for layer in &plan.experts {
        add(layer.len() as u64);
        for ranges in layer {
            add(ranges.len() as u64);
            for range in ranges {
                add(range.file as u64);
                add(range.offset);
                add(range.len);
            }
        }
    }
    Ok(hasher.digest())
}

fn sums_hash(sums: &Sums) -> u64 {
    let mut hasher = Xxh3Default::new();
    for layer in sums {
        hasher.update(&(layer.len() as u64).to_le_bytes());
        for ranges in layer {
            hasher.update(&(ranges.len() as u64).to_le_bytes());
            for sum in ranges {
                hasher.update(&sum.to_le_bytes());
            }
        }
    }
    hasher.digest()
}

/// The checksums kept at `path`, when it holds an intact index for `key` shaped like `plan`.
fn read_index(path: &Path, key: &str, plan: &ReadPlan) -> Option<Sums> {
    let text = fs::read(path).ok()?;
    let index: IndexFile = match serde_json::from_slice(&text) {
        Ok(index) => index,
        Err(error) => {
            tracing::debug!("ignoring {}: {error}", path.display());
            return None;
        }
    };
    if index.format != INDEX_FORMAT || index.version != INDEX_VERSION || index.key != key {
        tracing::debug!("ignoring {}: made for other files", path.display());
        return None;
    }
    let sums: Sums = index
        .experts
        .iter()
        .map(|l| {
            l.iter()
                .map(|e| e.iter().map(|s| parse_xxh3_hex(s)).collect())
                .collect()
        })
        .collect::<Option<_>>()?;
    let shaped_like_plan = sums.len() == plan.experts.len()
        && sums
            .iter()
            .zip(&plan.experts)
            .all(|(s, p)| s.len() == p.len() && s.iter().zip(p).all(|(s, p)| s.len() == p.len()));
    let intact = parse_xxh3_hex(&index.sums_xxh3_64) == Some(sums_hash(&sums));
    if !(shaped_like_plan && intact) {
        tracing::warn!("ignoring {}: damaged", path.display());
        return None;
    }
    Some(sums)
}

/// Reads every range of `plan` once, with a few reads in flight, and hashes it.
fn compute(plan: &ReadPlan, bypass_cache: bool, vouch: Option<Vouch>) -> Result<Sums> {
    let experts: Vec<(usize, usize)> = plan
        .experts
        .iter()
        .enumerate()
        .flat_map(|(layer, list)| (0..list.len()).map(move |expert| (layer, expert)))
        .collect();
    let next = AtomicUsize::new(0);
    let checksum_expert = |layer: usize, expert: usize| -> Result<Vec<u64>> {
        let ranges = &plan.experts[layer][expert];
        let mut sums = Vec::with_capacity(ranges.len());
        for (i, range) in ranges.iter().enumerate() {
            // Fused experts' gate and up are views of one range: it is read once.
            if let Some(earlier) = ranges[..i].iter().position(|r| r == range) {
                sums.push(sums[earlier]);
                continue;
            }
            let path = &plan.files[range.file];
            let sum = checksum_range(path, range, bypass_cache, vouch).map_err(|message| {
                Error::Expert {
                    layer,
                    expert,
                    path: path.clone(),
                    message,
                }
            })?;
            sums.push(sum);
        }
        Ok(sums)
    };
    let sums: Mutex<Sums> = Mutex::new(
        plan.experts
            .iter()
            .map(|l| vec![Vec::new(); l.len()])
            .collect(),
    );
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    // A reader that panics makes the scope panic once all are joined.
    std::thread::scope(|scope| {
        for _ in 0..INDEX_READERS.min(experts.len()) {
            scope.spawn(|| {
                while let Some(&(layer, expert)) = experts.get(next.fetch_add(1, Ordering::Relaxed))
                {
                    match checksum_expert(layer, expert) {
                        Ok(expert_sums) => sums.lock().unwrap()[layer][expert] = expert_sums,
                        Err(error) => {
                            failure.lock().unwrap().get_or_insert(error);
                            // The load fails: the other readers stop at their next expert.
                            next.store(experts.len(), Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    match failure.into_inner().unwrap() {
        Some(error) => Err(error),
        None => Ok(sums.into_inner().unwrap()),
    }
}

fn checksum_range(
    path: &Path,
    range: &ByteRange,
    bypass_cache: bool,
    vouch: Option<Vouch>,
) -> std::result::Result<u64, String> {
    let (file, direct) = fetch::open_for_ranges(path, bypass_cache).map_err(|e| e.to_string())?;
    let len = range.len as usize;
    let (buf, at) = fetch::read_range(
        &file,
        direct,
        range.offset,
        len,
        bypass_cache,
        fetch::Pace::Whole,
    )
    .map_err(|e| e.to_string())?;
    let bytes = &buf[at..at + len];
    if let Some(vouch) = vouch {
        vouch(range, bytes)?;
    }
    Ok(xxh3_64(bytes))
}

/// Writes `bytes` to `path` so that a reader (or a crash) sees the old file or the new one whole:
/// into a temporary file beside it, synced, then renamed over it.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // Unique per process and call, so that two loads of one model never share a temporary file.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temporary = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    let written = File::create(&temporary)
        .and_then(|mut file| file.write_all(bytes).and_then(|()| file.sync_all()))
        .and_then(|()| fs::rename(&temporary, path));
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_over(path: &Path, len: u64) -> ReadPlan {
        let range = |offset, len| ByteRange {
            file: 0,
            offset,
            len,
        };
        ReadPlan {
            files: vec![path.to_path_buf()],
            experts: vec![
                vec![],
                vec![
                    vec![range(0, 100), range(100, 50)],
                    vec![range(150, len - 150)],
                ],
            ],
        }
    }

    #[test]
    fn an_index_is_kept_beside_the_model_and_reused_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.gguf");
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&model, &data).unwrap();
        let plan = plan_over(&model, data.len() as u64);

        let built = load_or_build(&model, &plan, false, None).unwrap();
        let index = dir.path().join("m.gguf.odmoe-checksums");
        assert!(index.is_file(), "kept beside the model");
        assert!(built.check(1, 0, 1, &data[100..150]).is_ok());
        let err = built.check(1, 1, 0, &data[149..]).unwrap_err();
        assert!(err.contains("checksum mismatch") && err.contains("m.gguf.odmoe-checksums"));

        // Reused: a range checks against the kept value even after the file changed on disk
        // without its length or modification time changing.
        let modified = fs::metadata(&model).unwrap().modified().unwrap();
        let mut changed = data.clone();
        changed[120] ^= 1;
        fs::write(&model, &changed).unwrap();
        File::options()
            .write(true)
            .open(&model)
            .unwrap()
            .set_modified(modified)
            .unwrap();
        let reused = load_or_build(&model, &plan, false, None).unwrap();
        assert!(reused.check(1, 0, 1, &changed[100..150]).is_err());

        // A new modification time is a new file: its index is computed again.
        File::options()
            .write(true)
            .open(&model)
            .unwrap()
            .set_modified(modified + std::time::Duration::from_secs(1))
            .unwrap();
        let rebuilt = load_or_build(&model, &plan, false, None).unwrap();
        assert!(rebuilt.check(1, 0, 1, &changed[100..150]).is_ok());
    }

    #[test]
    fn a_damaged_index_is_computed_again() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.gguf");
        fs::write(&model, vec![7u8; 300]).unwrap();
        let plan = plan_over(&model, 300);
        load_or_build(&model, &plan, false, None).unwrap();
        let index = dir.path().join("m.gguf.odmoe-checksums");
        let text = fs::read_to_string(&index).unwrap();
        let first = xxh3_hex(xxh3_64(&[7u8; 100]));
        fs::write(&index, text.replacen(&first, &xxh3_hex(1), 1)).unwrap();
        let checksums = load_or_build(&model, &plan, false, None).unwrap();
        assert!(checksums.check(1, 0, 0, &[7u8; 100]).is_ok());
    }

    #[test]
    fn a_vouch_failure_names_the_file_and_expert() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.gguf");
        fs::write(&model, vec![0u8; 300]).unwrap();
        let plan = plan_over(&model, 300);
        let refuse_second: Vouch = &|range, _| {
            (range.offset != 150)
                .then_some(())
                .ok_or_else(|| "not vouched for".to_string())
        };
        let err = load_or_build(&model, &plan, false, Some(refuse_second))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expert 1 of layer 1")
                && err.contains("m.gguf")
                && err.contains("not vouched"),
            "{err}"
        );
        assert!(!dir.path().join("m.gguf.odmoe-checksums").exists());
    }

    #[test]
    fn streamed_and_whole_xxh3_agree() {
        // The manifest's xxh3 is computed while a file streams past; the store's over one buffer.
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let mut streamed = Xxh3Default::new();
        for chunk in data.chunks(4093) {
            streamed.update(chunk);
        }
        assert_eq!(streamed.digest(), xxh3_64(&data));
    }
}
