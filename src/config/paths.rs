//! Paths as resolved configs store them: normalized lexically and relative to the working
//! folder, so run ids do not change when the project is cloned elsewhere.

use std::path::{Component, Path, PathBuf};

/// Lexically normalizes a path (no file system access: the file may not exist yet).
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                let last_is_up = matches!(
                    out.components().next_back(),
                    Some(Component::ParentDir) | None
                );
                if last_is_up && !p.is_absolute() {
                    out.push("..");
                } else {
                    out.pop();
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// `to` expressed relative to the folder `from` (both made absolute first).
pub fn relative_to(to: &Path, from: &Path) -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_default();
    let to = normalize(&cwd.join(to));
    let from = normalize(&cwd.join(from));
    let t: Vec<_> = to.components().collect();
    let f: Vec<_> = from.components().collect();
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return to;
    }
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    if out.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        out
    }
}

/// A path as stored in resolved configs: relative to the working folder, so that run ids do
/// not change when the project is cloned elsewhere.
pub fn portable_path(p: &Path) -> String {
    let cwd = std::env::current_dir().unwrap_or_default();
    relative_to(p, &cwd).to_string_lossy().replace('\\', "/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_to(Path::new("/a/b/c"), Path::new("/a/d")),
            PathBuf::from("../b/c")
        );
        assert_eq!(normalize(Path::new("x/./y/../z")), PathBuf::from("x/z"));
        assert_eq!(normalize(Path::new("./../../a")), PathBuf::from("../../a"));
        assert_eq!(normalize(Path::new("/a/../../b")), PathBuf::from("/b"));
    }
}
