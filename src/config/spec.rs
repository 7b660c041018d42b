//! An experiment: its file's layer stacked on built-in defaults < recipe chain < the file <
//! `--set`, with its varying keys read but not yet expanded.

use std::path::{Path, PathBuf};

use serde_json::Value as J;

use super::doc::Doc;
use super::error::ConfigError;
use super::keys;
use super::layer::{Role, merge, parse_set, validate};
use super::recipe;
use super::vary::Vary;

/// An experiment with everything but its varying keys resolved.
#[derive(Debug, Clone)]
pub struct Experiment {
    pub file: PathBuf,
    pub name: String,
    /// defaults < recipes < experiment < `--set`, before the grid.
    pub base: J,
    pub vary: Vary,
    /// Where each key was last set, to point errors found after merging at a line.
    pub origins: Vec<(String, PathBuf, usize)>,
}

impl Experiment {
    /// Where `key` was set (file, line), or the experiment file when it is a default.
    pub fn origin(&self, key: &str) -> (PathBuf, usize) {
        self.origins
            .iter()
            .rev()
            .find(|(k, _, _)| k == key)
            .map(|(_, f, l)| (f.clone(), *l))
            .unwrap_or((self.file.clone(), 0))
    }
}

/// Loads an experiment (or a run's `config.yaml`) with its recipe chain and `--set` overrides.
pub fn load_experiment(path: &Path, sets: &[String]) -> Result<Experiment, ConfigError> {
    let doc = Doc::load(path)?;
    let layer = validate(&doc, Role::Experiment)?;
    let chain = recipe::load_chain(&layer)?;
    let mut base = keys::defaults();
    let mut origins = Vec::new();
    for l in chain.iter().chain(std::iter::once(&layer)) {
        merge(&mut base, &l.values);
        origins.extend(
            l.lines
                .iter()
                .map(|(k, line)| (k.clone(), l.file.clone(), *line)),
        );
    }
    for set in sets {
        let (key, value) = parse_set(set)?;
        keys::set_path(&mut base, &key, value);
        origins.push((key, PathBuf::new(), 0));
    }
    for required in ["name", "model", "data"] {
        if keys::get_path(&base, required).is_none() {
            return Err(
                ConfigError::at(path, 0, format!("missing required key `{required}`"))
                    .key(required)
                    .hint(keys::info(required).map(|i| i.doc).unwrap_or("")),
            );
        }
    }
    let name = base["name"].as_str().unwrap_or_default().to_string();
    if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
        return Err(ConfigError::at(
            path,
            layer.line_of("name"),
            format!("`{name}` cannot be a folder name"),
        )
        .key("name")
        .hint("use letters, digits, `-` and `_`"));
    }
    let vary = Vary::parse(&doc)?;
    Ok(Experiment {
        file: path.to_path_buf(),
        name,
        base,
        vary,
        origins,
    })
}
