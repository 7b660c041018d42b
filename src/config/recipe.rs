//! Recipes: reusable settings in YAML or TOML that an experiment (or another recipe) names with
//! `recipe: path`. A chain is applied parent-first, so each file overrides the ones it names.

use std::path::PathBuf;

use super::doc::Doc;
use super::error::ConfigError;
use super::layer::{Layer, Role, validate};
use super::paths::normalize;

/// The recipes `start` names, transitively, ordered from the root parent to the nearest.
pub fn load_chain(start: &Layer) -> Result<Vec<Layer>, ConfigError> {
    let mut chain: Vec<Layer> = Vec::new();
    let mut seen: Vec<PathBuf> = vec![identity(&start.file)];
    let mut next = start.recipe.clone().map(|r| (r, start.file.clone()));
    while let Some(((path, line), named_by)) = next {
        let id = identity(&path);
        if let Some(pos) = seen.iter().position(|p| *p == id) {
            let mut cycle: Vec<String> = seen[pos..]
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            cycle.push(id.display().to_string());
            return Err(ConfigError::at(
                &named_by,
                line,
                format!("recipe cycle: {}", cycle.join(" → ")),
            )
            .key("recipe")
            .hint("a recipe may not name itself or one of the files that names it"));
        }
        if !path.is_file() {
            return Err(ConfigError::at(
                &named_by,
                line,
                format!("recipe file `{}` does not exist", path.display()),
            )
            .key("recipe")
            .hint("recipe paths are relative to the file that names them"));
        }
        let doc = Doc::load(&path)?;
        let layer = validate(&doc, Role::Recipe)?;
        seen.push(id);
        next = layer.recipe.clone().map(|r| (r, path.clone()));
        chain.push(layer);
    }
    chain.reverse();
    Ok(chain)
}

fn identity(p: &std::path::Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| normalize(p))
}
