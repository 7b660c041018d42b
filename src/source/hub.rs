//! The Hugging Face Hub: `hf:org/name[@revision][/file]` downloaded into the standard Hugging
//! Face cache (`models--org--name/{blobs,snapshots,refs}`), so tuna, transformers, mlx-lm and
//! `hf download` share one copy. Uses the Hub's documented HTTP API: the revision's file list
//! (`/api/models/{repo}/revision/{rev}`), and `/{repo}/resolve/{commit}/{file}`, whose answer
//! names the file's blob (`X-Linked-Etag`/`ETag`: the SHA-256 of an LFS file, else its git blob
//! id), which is also the checksum. Environment, as huggingface_hub reads it: `HF_ENDPOINT`,
//! `HF_TOKEN` (else `$HF_HOME/token`), `HF_HUB_OFFLINE`, `HF_HUB_CACHE`/`HF_HOME`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use super::http::{Checksum, Client};

/// Files of a model repository tuna needs (besides the weights).
const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors.index.json",
];

/// Where and how to reach the Hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// `https://huggingface.co` unless `HF_ENDPOINT` says otherwise; no trailing slash.
    pub endpoint: String,
    pub token: Option<String>,
    /// The hub cache folder (`…/huggingface/hub`).
    pub cache: PathBuf,
    /// Read the cache only (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.trim().is_empty())
}

impl HubConfig {
    pub fn from_env() -> Result<Self> {
        let cache = super::hf_hub_cache_dir().ok_or_else(|| {
            anyhow!("cannot locate the Hugging Face cache: set HF_HUB_CACHE, HF_HOME or HOME")
        })?;
        let token = env("HF_TOKEN").or_else(|| {
            let file = env("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| {
                env("HF_HOME")
                    .map(|h| PathBuf::from(h).join("token"))
                    .or_else(|| super::home_dir().map(|h| h.join(".cache/huggingface/token")))
            })?;
            std::fs::read_to_string(file)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let offline = env("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
        });
        Ok(Self {
            endpoint: env("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            token,
            cache,
            offline,
        })
    }
}

/// A parsed `org/name[@revision][/path]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRef {
    pub repo: String,
    pub revision: String,
    pub file: Option<String>,
}

impl RepoRef {
    pub fn parse(rest: &str) -> Result<Self> {
        let spec = format!("hf:{rest}");
        let mut parts = rest.splitn(3, '/');
        let org = parts.next().unwrap_or("");
        let name_rev = parts.next().unwrap_or("");
        let file = parts.next().filter(|p| !p.is_empty());
        let (name, revision) = name_rev.split_once('@').unwrap_or((name_rev, "main"));
        if !super::valid_repo_part(org) || !super::valid_repo_part(name) {
            bail!("`{spec}`: expected hf:org/name[@revision][/path/in/repo]");
        }
        if revision.is_empty() || revision.contains("..") || revision.contains('/') {
            bail!("`{spec}`: bad revision `{revision}`");
        }
        if let Some(f) = file
            && f.split('/').any(|c| c.is_empty() || c == "..")
        {
            bail!("`{spec}`: bad path inside the repository `{f}`");
        }
        Ok(Self {
            repo: format!("{org}/{name}"),
            revision: revision.to_string(),
            file: file.map(str::to_string),
        })
    }

    fn spec(&self) -> String {
        let mut s = format!("hf:{}", self.repo);
        if self.revision != "main" {
            s += &format!("@{}", self.revision);
        }
        if let Some(f) = &self.file {
            s += &format!("/{f}");
        }
        s
    }
}

fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

/// The Hub client over one cache.
pub struct Hub {
    pub config: HubConfig,
    client: Client,
}

impl Hub {
    pub fn new(config: HubConfig) -> Self {
        let host = config
            .endpoint
            .split_once("://")
            .map_or(config.endpoint.as_str(), |(_, r)| r)
            .split('/')
            .next()
            .unwrap_or("")
            .to_string();
        let client = Client::new(config.token.clone().map(|t| (host, t)));
        Self { config, client }
    }

    fn repo_dir(&self, r: &RepoRef) -> PathBuf {
        self.config
            .cache
            .join(format!("models--{}", r.repo.replace('/', "--")))
    }

    /// The local path of what `r` names: the snapshot folder (or the one file), downloading
    /// what is missing unless offline.
    pub fn fetch(&self, r: &RepoRef) -> Result<PathBuf> {
        if self.config.offline {
            return self.cached(r).with_context(|| {
                format!(
                    "`{}` is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set; unset it to download",
                    r.spec(),
                    self.config.cache.display()
                )
            });
        }
        let (commit, siblings) = match self.revision_info(r) {
            Ok(v) => v,
            Err(e) if e.downcast_ref::<Unreachable>().is_some() => {
                // No network: what the cache has still works, as with huggingface_hub.
                return self.cached(r).map_err(|_| e).inspect(|_| {
                    eprintln!(
                        "note: {} is unreachable; using the cached `{}`",
                        self.config.endpoint,
                        r.spec()
                    )
                });
            }
            Err(e) => return Err(e),
        };
        let files = match &r.file {
            Some(f) => {
                let inside = |s: &String| s == f || s.starts_with(&format!("{f}/"));
                let files: Vec<String> = siblings.iter().filter(|s| inside(s)).cloned().collect();
                if files.is_empty() {
                    bail!(
                        "`{}`: {f} is not in {} at revision {}",
                        r.spec(),
                        r.repo,
                        r.revision
                    );
                }
                files
            }
            None => model_files(r, &siblings)?,
        };
        let repo_dir = self.repo_dir(r);
        for f in &files {
            self.file(r, &repo_dir, &commit, f)?;
        }
        if !is_commit(&r.revision) || r.revision != commit {
            let refs = repo_dir.join("refs");
            std::fs::create_dir_all(&refs)?;
            crate::files::write_atomic(&refs.join(&r.revision), commit.as_bytes())?;
        }
        let snap = repo_dir.join("snapshots").join(&commit);
        Ok(match &r.file {
            Some(f) => snap.join(f),
            None => snap,
        })
    }

    /// The revision's commit and file list, from the Hub's API.
    fn revision_info(&self, r: &RepoRef) -> Result<(String, Vec<String>)> {
        let url = format!(
            "{}/api/models/{}/revision/{}",
            self.config.endpoint, r.repo, r.revision
        );
        let reply = self
            .client
            .get(&url)
            .map_err(|e| anyhow::Error::new(Unreachable(format!("{e:#}"))))?;
        let status = reply.status.as_u16();
        if status != 200 {
            return Err(self.refusal(r, status, reply.header("x-error-code").map(str::to_string)));
        }
        let v: Value = serde_json::from_str(&reply.text())
            .with_context(|| format!("{url}: the Hub's answer is not JSON"))?;
        let commit = v["sha"]
            .as_str()
            .filter(|s| is_commit(s))
            .with_context(|| format!("{url}: the answer names no commit (`sha`)"))?
            .to_string();
        let siblings = v["siblings"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s["rfilename"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok((commit, siblings))
    }

    /// The error for a refused request, naming what to do.
    fn refusal(&self, r: &RepoRef, status: u16, code: Option<String>) -> anyhow::Error {
        let page = format!("{}/{}", self.config.endpoint, r.repo);
        match (status, code.as_deref()) {
            (401 | 403, Some("GatedRepo")) | (403, _) => anyhow!(
                "`{}`: the model is gated: accept its terms at {page} and set HF_TOKEN to a token of that account{}",
                r.spec(),
                if self.config.token.is_some() {
                    " (the token given was refused)"
                } else {
                    ""
                }
            ),
            (401, _) => anyhow!(
                "`{}`: the Hub refused access (401): the model is private or does not exist; if it is yours, set HF_TOKEN{}",
                r.spec(),
                if self.config.token.is_some() {
                    " (the token given was refused)"
                } else {
                    ""
                }
            ),
            (404, Some("RevisionNotFound")) => anyhow!(
                "`{}`: {} has no revision `{}`",
                r.spec(),
                r.repo,
                r.revision
            ),
            (404, Some("EntryNotFound")) => {
                anyhow!("`{}`: the file is not in {}", r.spec(), r.repo)
            }
            (404, _) => anyhow!(
                "`{}`: model not found on {} (check the name at {page})",
                r.spec(),
                self.config.endpoint
            ),
            (s, _) => anyhow!("`{}`: the Hub answered HTTP {s}", r.spec()),
        }
    }

    /// One file of the snapshot: linked to its blob, downloaded if no snapshot has it yet.
    fn file(&self, r: &RepoRef, repo_dir: &Path, commit: &str, name: &str) -> Result<()> {
        let link = repo_dir.join("snapshots").join(commit).join(name);
        if link.exists() {
            return Ok(());
        }
        let url = format!(
            "{}/{}/resolve/{commit}/{name}",
            self.config.endpoint, r.repo
        );
        let head = self.client.head(&url)?;
        let status = head.status.as_u16();
        if !(200..400).contains(&status) {
            let code = head.header("x-error-code").map(str::to_string);
            return Err(self.refusal(r, status, code));
        }
        let etag = head
            .header("x-linked-etag")
            .or_else(|| head.header("etag"))
            .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string())
            .filter(|e| !e.is_empty() && !e.contains(['/', '\\']))
            .with_context(|| format!("HEAD {url}: no ETag to name the file's blob"))?;
        let size = head
            .header("x-linked-size")
            .or_else(|| head.header("content-length"))
            .and_then(|s| s.parse().ok());
        let checksum = match etag.len() {
            64 => Checksum::Sha256(etag.clone()),
            40 => Checksum::GitBlob(etag.clone()),
            _ => Checksum::None,
        };
        let blobs = repo_dir.join("blobs");
        std::fs::create_dir_all(&blobs)
            .with_context(|| format!("cannot create {}", blobs.display()))?;
        let blob = blobs.join(&etag);
        {
            // Two processes fetching one model: the second waits and then finds the blob.
            let _lock = crate::files::lock_exclusive(&blobs.join(format!("{etag}.lock")))?;
            if !blob.exists() {
                self.client.download(
                    &url,
                    &blob,
                    &checksum,
                    size,
                    &format!("{}/{name}", r.repo),
                )?;
            }
        }
        link_blob(&blob, &link)
    }

    /// What the cache already has for `r` (no network).
    pub fn cached(&self, r: &RepoRef) -> Result<PathBuf> {
        let repo_dir = self.repo_dir(r);
        let commit = if is_commit(&r.revision) {
            r.revision.clone()
        } else {
            let f = repo_dir.join("refs").join(&r.revision);
            std::fs::read_to_string(&f)
                .map(|c| c.trim().to_string())
                .with_context(|| format!("no {}", f.display()))?
        };
        let snap = repo_dir.join("snapshots").join(&commit);
        let path = match &r.file {
            Some(f) => snap.join(f),
            None => snap,
        };
        if !path.exists() {
            bail!("no {}", path.display());
        }
        Ok(path)
    }
}

/// A request that never reached the Hub (DNS, refused connection, timeout).
#[derive(Debug)]
struct Unreachable(String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot reach the Hugging Face Hub ({}); set HF_HUB_OFFLINE=1 to use the cache only",
            self.0
        )
    }
}

impl std::error::Error for Unreachable {}

/// Which files of a repository make the model: config, tokenizer and the safetensors weights.
fn model_files(r: &RepoRef, siblings: &[String]) -> Result<Vec<String>> {
    let top = |s: &&String| !s.contains('/');
    let weights: Vec<&String> = siblings
        .iter()
        .filter(top)
        .filter(|s| s.ends_with(".safetensors"))
        .collect();
    if !siblings.iter().any(|s| s == "config.json") || weights.is_empty() {
        let ggufs: Vec<&String> = siblings.iter().filter(|s| s.ends_with(".gguf")).collect();
        if !ggufs.is_empty() {
            bail!(
                "`{}` holds GGUF files, not a safetensors model; name one: {}",
                r.spec(),
                ggufs
                    .iter()
                    .map(|g| format!("hf:{}/{g}", r.repo))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        bail!(
            "`{}` has no config.json and *.safetensors weights at the top level; it holds: {}",
            r.spec(),
            siblings.join(", ")
        );
    }
    let mut files: Vec<String> = MODEL_FILES
        .iter()
        .filter(|f| siblings.iter().any(|s| s == *f))
        .map(|f| f.to_string())
        .collect();
    files.extend(weights.into_iter().cloned());
    Ok(files)
}

/// The snapshot entry for a blob: a relative symlink as huggingface_hub makes (a copy where
/// symlinks are not available).
fn link_blob(blob: &Path, link: &Path) -> Result<()> {
    let parent = link.parent().context("snapshot path without a parent")?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    #[cfg(unix)]
    {
        // snapshots/<commit>/<a/b/file> -> ../../[../..]blobs/<etag>
        let depth = link
            .strip_prefix(
                parent
                    .ancestors()
                    .find(|p| p.ends_with("snapshots"))
                    .unwrap_or(parent),
            )
            .map_or(2, |p| p.components().count());
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(blob.file_name().context("blob without a name")?);
        let tmp = crate::files::unique_tmp(link);
        std::os::unix::fs::symlink(&target, &tmp)
            .with_context(|| format!("cannot link {}", link.display()))?;
        std::fs::rename(&tmp, link).with_context(|| format!("cannot link {}", link.display()))
    }
    #[cfg(not(unix))]
    {
        std::fs::copy(blob, link)
            .map(|_| ())
            .with_context(|| format!("cannot copy {} to {}", blob.display(), link.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_refs() {
        let r = RepoRef::parse("org/name@v1/sub/model.gguf").unwrap();
        assert_eq!(r.repo, "org/name");
        assert_eq!(r.revision, "v1");
        assert_eq!(r.file.as_deref(), Some("sub/model.gguf"));
        assert_eq!(RepoRef::parse("org/name").unwrap().revision, "main");
        assert!(RepoRef::parse("org").is_err());
        assert!(RepoRef::parse("org/name/../x").is_err());
    }
}
