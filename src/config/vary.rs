//! An experiment's varying keys as written: `grid`, `zip`, `exclude` and `seeds`.
//!
//! ```yaml
//! grid:                      # cartesian product, in file order (first key varies slowest)
//!   lora.rank: [4, 8]
//!   train.learning_rate: 2e-5    # a scalar is a one-element list
//! zip:                       # one axis whose points set several keys together
//!   - {train.iters: 200, train.lr_schedule: "100:2e-5,100:1e-5"}
//!   - {train.iters: 400, train.lr_schedule: "200:2e-5,200:1e-5"}
//! exclude:                   # drop points that match every key of an entry
//!   - {lora.rank: 8, train.iters: 400}
//! seeds: [0, 1, 2]           # repeat every point with train.seed set to each
//! ```
//! `zip` may also be a list of such lists: several zipped axes.

use std::path::Path;

use serde_json::Value as J;

use super::doc::{Doc, Node, Value};
use super::error::ConfigError;
use super::keys;
use super::layer::check;

/// One axis: the keys it sets and, for each point, their values.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub points: Vec<Vec<(String, J)>>,
    pub line: usize,
}

/// An experiment's varying keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Vary {
    pub axes: Vec<Axis>,
    pub exclude: Vec<(Vec<(String, J)>, usize)>,
    pub seeds: Vec<i64>,
    pub file: std::path::PathBuf,
}

const NOT_VARIABLE: &[&str] = &["name", "train.seed"];

impl Vary {
    /// The varied keys, in order (for table and CSV columns).
    pub fn keys(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for axis in &self.axes {
            for point in &axis.points {
                for (k, _) in point {
                    if !out.contains(k) {
                        out.push(k.clone());
                    }
                }
            }
        }
        out
    }

    /// Reads `grid`, `zip`, `exclude` and `seeds` from an experiment file.
    pub fn parse(doc: &Doc) -> Result<Vary, ConfigError> {
        let dir = doc.path.parent().unwrap_or(Path::new("."));
        let mut vary = Vary {
            file: doc.path.clone(),
            ..Default::default()
        };
        if let Some(grid) = doc.root.get("grid") {
            vary.axes.extend(grid_axes(doc, grid, dir)?);
        }
        if let Some(zip) = doc.root.get("zip") {
            vary.axes.extend(zip_axes(doc, zip, dir)?);
        }
        let seen = varied_keys_once(doc, &vary.axes)?;
        if let Some(ex) = doc.root.get("exclude") {
            vary.exclude = parse_exclude(doc, ex, dir, &seen)?;
        }
        if let Some(seeds) = doc.root.get("seeds") {
            vary.seeds = parse_seeds(doc, seeds)?;
        }
        Ok(vary)
    }
}

/// An error at `line` of the experiment file, attributed to `key`.
fn err_at(doc: &Doc, line: usize, key: &str, msg: String) -> ConfigError {
    ConfigError::at(&doc.path, line, msg).key(key.to_string())
}

/// One axis per `grid` key, each point setting that key alone; keys that name a run or its
/// seed are refused here because they have their own places (`name`, `seeds`).
fn grid_axes(doc: &Doc, grid: &Node, dir: &Path) -> Result<Vec<Axis>, ConfigError> {
    let Some(entries) = grid.as_map() else {
        return Err(err_at(
            doc,
            grid.line,
            "grid",
            format!("expected a mapping `key: [values]`, found {}", grid.kind()),
        ));
    };
    let mut axes = Vec::new();
    for (key, values) in entries {
        let key_name = format!("grid.{key}");
        if NOT_VARIABLE.contains(&key.as_str()) {
            let hint = if key == "train.seed" {
                "use `seeds: [...]`"
            } else {
                "a run's experiment name is fixed"
            };
            return Err(err_at(
                doc,
                values.line,
                &key_name,
                format!("`{key}` cannot be varied"),
            )
            .hint(hint));
        }
        let items = as_list(values);
        if items.is_empty() {
            return Err(err_at(
                doc,
                values.line,
                &key_name,
                "has an empty list: the grid would have no runs".into(),
            ));
        }
        let mut points = Vec::new();
        for item in items {
            let v = check(key, &item, dir).map_err(|e| {
                ConfigError {
                    file: doc.path.clone(),
                    ..e
                }
                .key(key_name.clone())
            })?;
            points.push(vec![(key.clone(), v)]);
        }
        axes.push(Axis {
            points,
            line: values.line,
        });
    }
    Ok(axes)
}

/// The `zip` axes: one list of entries, or a list of such lists (several zipped axes). Every
/// entry of an axis must set the same keys, or its points would not line up.
fn zip_axes(doc: &Doc, zip: &Node, dir: &Path) -> Result<Vec<Axis>, ConfigError> {
    let items = as_list(zip);
    let nested = items.iter().all(|i| matches!(i.value, Value::Seq(_)));
    let groups: Vec<Vec<Node>> = if nested && !items.is_empty() {
        items.iter().map(as_list).collect()
    } else {
        vec![items]
    };
    let mut axes = Vec::new();
    for group in groups {
        if group.is_empty() {
            return Err(err_at(
                doc,
                zip.line,
                "zip",
                "has an empty list: the grid would have no runs".into(),
            ));
        }
        let mut points = Vec::new();
        let mut first_keys: Option<Vec<String>> = None;
        for entry in &group {
            let assignment = parse_assignment(entry, "zip", dir, &doc.path)?;
            let ks: Vec<String> = assignment.iter().map(|(k, _)| k.clone()).collect();
            match &first_keys {
                None => first_keys = Some(ks),
                Some(f) if *f != ks => {
                    return Err(err_at(
                        doc,
                        entry.line,
                        "zip",
                        format!(
                            "every entry of a zip must set the same keys; the first sets {} but this one sets {}",
                            f.join(", "),
                            ks.join(", ")
                        ),
                    ));
                }
                _ => {}
            }
            points.push(assignment);
        }
        axes.push(Axis {
            points,
            line: group[0].line,
        });
    }
    Ok(axes)
}

/// The varied keys in axis order, failing when one is varied by two axes: the product would
/// set it twice per run, with no way to say which value wins.
fn varied_keys_once(doc: &Doc, axes: &[Axis]) -> Result<Vec<String>, ConfigError> {
    let mut seen: Vec<String> = Vec::new();
    for axis in axes {
        let mut axis_keys: Vec<String> = axis.points[0].iter().map(|(k, _)| k.clone()).collect();
        axis_keys.dedup();
        for k in axis_keys {
            if seen.contains(&k) {
                return Err(err_at(
                    doc,
                    axis.line,
                    &k,
                    "is varied twice (in grid and zip, or in two zips)".into(),
                )
                .hint("vary each key in one place"));
            }
            seen.push(k);
        }
    }
    Ok(seen)
}

/// The `exclude` entries with their lines; an entry may only name varied keys (`seen`), since
/// any other key is the same in every point and could never tell points apart.
fn parse_exclude(
    doc: &Doc,
    ex: &Node,
    dir: &Path,
    seen: &[String],
) -> Result<Vec<(Vec<(String, J)>, usize)>, ConfigError> {
    let mut exclude = Vec::new();
    for entry in as_list(ex) {
        let assignment = parse_assignment(&entry, "exclude", dir, &doc.path)?;
        for (k, _) in &assignment {
            if !seen.contains(k) {
                return Err(err_at(
                    doc,
                    entry.line,
                    &format!("exclude.{k}"),
                    "is not varied by `grid` or `zip`".into(),
                )
                .hint(format!(
                    "varied keys: {}",
                    if seen.is_empty() {
                        "none".into()
                    } else {
                        seen.join(", ")
                    }
                )));
            }
        }
        exclude.push((assignment, entry.line));
    }
    Ok(exclude)
}

/// The `seeds` list: whole numbers ≥ 0, each once (a repeated seed would repeat runs).
fn parse_seeds(doc: &Doc, seeds: &Node) -> Result<Vec<i64>, ConfigError> {
    let items = as_list(seeds);
    if items.is_empty() {
        return Err(err_at(doc, seeds.line, "seeds", "is an empty list".into())
            .hint("remove it, or list at least one seed"));
    }
    let mut out = Vec::new();
    for s in items {
        match s.value {
            Value::Int(i) if i >= 0 => {
                if out.contains(&i) {
                    return Err(err_at(
                        doc,
                        s.line,
                        "seeds",
                        format!("seed {i} is listed twice"),
                    ));
                }
                out.push(i)
            }
            _ => {
                return Err(err_at(
                    doc,
                    s.line,
                    "seeds",
                    format!(
                        "expected whole numbers ≥ 0, found {} `{}`",
                        s.kind(),
                        keys::short(&s)
                    ),
                ));
            }
        }
    }
    Ok(out)
}

fn as_list(node: &Node) -> Vec<Node> {
    match &node.value {
        Value::Seq(items) => items.clone(),
        _ => vec![node.clone()],
    }
}

fn parse_assignment(
    entry: &Node,
    section: &str,
    dir: &Path,
    file: &Path,
) -> Result<Vec<(String, J)>, ConfigError> {
    let Some(map) = entry.as_map() else {
        return Err(ConfigError::at(
            file,
            entry.line,
            format!(
                "expected a mapping like `{{lora.rank: 8}}`, found {}",
                entry.kind()
            ),
        )
        .key(section.to_string()));
    };
    if map.is_empty() {
        return Err(
            ConfigError::at(file, entry.line, "an empty entry matches everything".into())
                .key(section.to_string()),
        );
    }
    map.iter()
        .map(|(k, v)| {
            if NOT_VARIABLE.contains(&k.as_str()) {
                return Err(
                    ConfigError::at(file, v.line, format!("`{k}` cannot be varied"))
                        .key(format!("{section}.{k}")),
                );
            }
            check(k, v, dir)
                .map(|j| (k.clone(), j))
                .map_err(|e| ConfigError {
                    file: file.to_path_buf(),
                    key: Some(format!("{section}.{k}")),
                    ..e
                })
        })
        .collect()
}
