//! Writes that survive a crash or a full disk: a file is written beside its target, synced and
//! renamed over it, so readers see the old or the new content, never half of one; a failed
//! write removes its temporary file. Also the advisory lock shared writers take.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, anyhow};

/// The user's home folder, from `$HOME`.
pub fn home_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(std::path::PathBuf::from)
}

/// tuna's cache folder (downloads, fingerprints, GPU kernels): `$TUNA_CACHE`, else
/// `~/.cache/tuna`.
pub fn tuna_cache_dir() -> Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("TUNA_CACHE").filter(|v| !v.is_empty()) {
        return Ok(std::path::PathBuf::from(p));
    }
    home_dir()
        .map(|h| h.join(".cache").join("tuna"))
        .ok_or_else(|| anyhow!("cannot locate a cache folder: set TUNA_CACHE or HOME"))
}

/// Replaces `path` with `bytes` atomically (temporary file, fsync, rename, fsync the folder).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = unique_tmp(path);
    let written = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot replace {}", path.display()));
    }
    // The rename is durable once the folder's entry is; not every platform can open a folder.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A temporary name beside `path`, unique per process and per call, so threads and processes
/// writing the same file never share one.
pub fn unique_tmp(path: &Path) -> std::path::PathBuf {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id(),
        WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ))
}

/// An exclusive advisory lock on `path` (created if needed), held until the guard drops.
pub fn lock_exclusive(path: &Path) -> Result<File> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    f.lock()
        .with_context(|| format!("cannot lock {}", path.display()))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "only the target remains");
    }

    #[test]
    fn failed_write_cleans_up_and_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        // The target is a folder: the rename fails after the temporary file was written.
        let p = tmp.path().join("taken");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("x"), b"keep").unwrap();
        let e = write_atomic(&p, b"new").unwrap_err();
        assert!(format!("{e:#}").contains("taken"), "{e:#}");
        let names: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["taken".to_string()], "the .tmp is removed");
    }
}
