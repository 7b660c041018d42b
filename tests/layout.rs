//! The README's layout table and the source tree agree: every module under `src/` has a row,
//! and every `src/` row names something that exists.

use std::collections::BTreeSet;
use std::path::Path;

#[test]
fn readme_layout_table_matches_the_tree() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section = readme
        .split("## Layout")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has a Layout section");
    let rows: BTreeSet<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|p| p.starts_with("src/"))
        .map(|p| p.trim_end_matches('/').to_string())
        .collect();
    let mut tree = BTreeSet::new();
    for e in std::fs::read_dir(root.join("src")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if e.path().is_dir() {
            tree.insert(format!("src/{name}"));
        } else if name.ends_with(".rs") && name != "lib.rs" && name != "main.rs" {
            tree.insert(format!("src/{name}"));
        }
    }
    let missing: Vec<_> = tree.difference(&rows).collect();
    let stale: Vec<_> = rows.difference(&tree).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "README layout: no row for {missing:?}; rows for what does not exist: {stale:?}"
    );
}
