//! One spec file (experiment, recipe, or a run's resolved `config.yaml`) read into a validated
//! layer: every key checked against the catalog, values and paths normalized.

use std::path::{Path, PathBuf};

use serde_json::Value as J;

use super::doc::{Doc, Node, Value};
use super::error::ConfigError;
use super::keys::{self, Kind, SECTIONS, VARYING};
use super::paths::portable_path;

/// What a file is allowed to hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Role {
    Experiment,
    Recipe,
}

/// One validated file: its keys in canonical JSON, and where each came from.
#[derive(Debug, Clone)]
pub struct Layer {
    pub file: PathBuf,
    pub values: J,
    /// (dotted key, line) for every leaf key set by this file.
    pub lines: Vec<(String, usize)>,
    /// The `recipe:` this file names, resolved against its folder.
    pub recipe: Option<(PathBuf, usize)>,
}

impl Layer {
    pub fn line_of(&self, key: &str) -> usize {
        self.lines
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, l)| *l)
            .unwrap_or(0)
    }
}

/// Validates every key of a file against the catalog and normalizes values and paths.
pub fn validate(doc: &Doc, role: Role) -> Result<Layer, ConfigError> {
    let dir = doc.path.parent().unwrap_or(Path::new("."));
    let mut layer = Layer {
        file: doc.path.clone(),
        values: J::Object(Default::default()),
        lines: vec![],
        recipe: None,
    };
    for (key, node) in doc.root.as_map().unwrap_or_default() {
        let err = |msg: String| ConfigError::at(&doc.path, node.line, msg).key(key.clone());
        if key == "recipe" {
            match &node.value {
                Value::Str(s) if !s.trim().is_empty() => {
                    layer.recipe = Some((dir.join(s), node.line))
                }
                _ => {
                    return Err(err(format!(
                        "expected the path of a recipe file, found {}",
                        node.kind()
                    )))
                    .map_err(|e| e.hint("e.g. `recipe: ../recipes/lora-small.yaml`"));
                }
            }
            continue;
        }
        if VARYING.contains(&key.as_str()) {
            if role == Role::Recipe {
                return Err(err(
                    "a recipe holds reusable settings; varying keys belong in the experiment"
                        .into(),
                ));
            }
            continue; // parsed by grid.rs
        }
        if SECTIONS.contains(&key.as_str()) {
            let Some(entries) = node.as_map() else {
                return Err(err(format!(
                    "expected a mapping of `{key}.*` keys, found {}",
                    node.kind()
                )));
            };
            for (sub, sub_node) in entries {
                let full = format!("{key}.{sub}");
                set_leaf(&mut layer, doc, dir, &full, sub_node)?;
            }
            continue;
        }
        set_leaf(&mut layer, doc, dir, key, node)?;
    }
    Ok(layer)
}

fn set_leaf(
    layer: &mut Layer,
    doc: &Doc,
    dir: &Path,
    key: &str,
    node: &Node,
) -> Result<(), ConfigError> {
    let value = check(key, node, dir).map_err(|e| ConfigError {
        file: doc.path.clone(),
        ..e
    })?;
    keys::set_path(&mut layer.values, key, value);
    layer.lines.push((key.to_string(), node.line));
    Ok(())
}

/// Checks one dotted key and value; paths become relative to the working folder.
pub fn check(key: &str, node: &Node, dir: &Path) -> Result<J, ConfigError> {
    let place = |msg: String| ConfigError::at(Path::new(""), node.line, msg).key(key.to_string());
    let Some(info) = keys::info(key) else {
        if SECTIONS.contains(&key) {
            return Err(place(
                "is a section; give one of its keys, like `train.iters`".into(),
            ));
        }
        return Err(place("unknown key".into()).hint(keys::suggest(key)));
    };
    let mut value = keys::check_value(info, node).map_err(&place)?;
    if matches!(info.kind, Kind::Path | Kind::Model)
        && let J::String(s) = &value
        && !(info.kind == Kind::Model && (s.starts_with("hf:") || s.starts_with("pypi:")))
    {
        value = J::String(portable_path(&dir.join(s)));
    }
    Ok(value)
}

/// Parses one `--set key.path=value`; the value is read as YAML (`8`, `2e-5`, `[q_proj, v_proj]`).
pub fn parse_set(set: &str) -> Result<(String, J), ConfigError> {
    let here = Path::new("");
    let Some((key, raw)) = set.split_once('=') else {
        return Err(
            ConfigError::at(here, 0, format!("`{set}` is not `key.path=value`"))
                .hint("e.g. --set train.learning_rate=2e-5"),
        );
    };
    let key = key.trim();
    let text = format!("v: {raw}\n");
    let doc = Doc::parse(Path::new("set.yaml"), &text).map_err(|e| {
        ConfigError::at(
            here,
            0,
            format!("cannot read the value `{raw}`: {}", e.message),
        )
        .key(key)
    })?;
    let mut node = doc
        .root
        .get("v")
        .cloned()
        .unwrap_or(Node::new(Value::Null, 0));
    node.line = 0; // its line in our scratch text means nothing to the user
    let cwd = std::env::current_dir().unwrap_or_default();
    let value = check(key, &node, &cwd)?;
    Ok((key.to_string(), value))
}

/// Deep-merges `over` into `base` (maps merge, everything else replaces).
pub fn merge(base: &mut J, over: &J) {
    match (base, over) {
        (J::Object(b), J::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_is_deep() {
        let mut a = serde_json::json!({"train": {"iters": 1, "seed": 0}, "name": "a"});
        merge(&mut a, &serde_json::json!({"train": {"iters": 5}}));
        assert_eq!(
            a,
            serde_json::json!({"train": {"iters": 5, "seed": 0}, "name": "a"})
        );
    }
}
