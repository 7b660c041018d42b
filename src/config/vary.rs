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
        let at = |line: usize, key: &str, msg: String| {
            ConfigError::at(&doc.path, line, msg).key(key.to_string())
        };
        let in_file = |e: ConfigError| ConfigError {
            file: doc.path.clone(),
            ..e
        };
        let mut vary = Vary {
            file: doc.path.clone(),
            ..Default::default()
        };

        if let Some(grid) = doc.root.get("grid") {
            let Some(entries) = grid.as_map() else {
                return Err(at(
                    grid.line,
                    "grid",
                    format!("expected a mapping `key: [values]`, found {}", grid.kind()),
                ));
            };
            for (key, values) in entries {
                let key_name = format!("grid.{key}");
                if NOT_VARIABLE.contains(&key.as_str()) {
                    let hint = if key == "train.seed" {
                        "use `seeds: [...]`"
                    } else {
                        "a run's experiment name is fixed"
                    };
                    return Err(
                        at(values.line, &key_name, format!("`{key}` cannot be varied")).hint(hint),
                    );
                }
                let items = as_list(values);
                if items.is_empty() {
                    return Err(at(
                        values.line,
                        &key_name,
                        "has an empty list: the grid would have no runs".into(),
                    ));
                }
                let mut points = Vec::new();
                for item in items {
                    let v = check(key, &item, dir).map_err(|e| in_file(e).key(key_name.clone()))?;
                    points.push(vec![(key.clone(), v)]);
                }
                vary.axes.push(Axis {
                    points,
                    line: values.line,
                });
            }
        }

        if let Some(zip) = doc.root.get("zip") {
            let items = as_list(zip);
            let nested = items.iter().all(|i| matches!(i.value, Value::Seq(_)));
            let groups: Vec<Vec<Node>> = if nested && !items.is_empty() {
                items.iter().map(as_list).collect()
            } else {
                vec![items]
            };
            for group in groups {
                if group.is_empty() {
                    return Err(at(
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
                            return Err(at(
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
                vary.axes.push(Axis {
                    points,
                    line: group[0].line,
                });
            }
        }

        let mut seen: Vec<String> = Vec::new();
        for axis in &vary.axes {
            let mut axis_keys: Vec<String> =
                axis.points[0].iter().map(|(k, _)| k.clone()).collect();
            axis_keys.dedup();
            for k in axis_keys {
                if seen.contains(&k) {
                    return Err(at(
                        axis.line,
                        &k,
                        "is varied twice (in grid and zip, or in two zips)".into(),
                    )
                    .hint("vary each key in one place"));
                }
                seen.push(k);
            }
        }

        if let Some(ex) = doc.root.get("exclude") {
            for entry in as_list(ex) {
                let assignment = parse_assignment(&entry, "exclude", dir, &doc.path)?;
                for (k, _) in &assignment {
                    if !seen.contains(k) {
                        return Err(at(
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
                vary.exclude.push((assignment, entry.line));
            }
        }

        if let Some(seeds) = doc.root.get("seeds") {
            let items = as_list(seeds);
            if items.is_empty() {
                return Err(at(seeds.line, "seeds", "is an empty list".into())
                    .hint("remove it, or list at least one seed"));
            }
            for s in items {
                match s.value {
                    Value::Int(i) if i >= 0 => {
                        if vary.seeds.contains(&i) {
                            return Err(at(s.line, "seeds", format!("seed {i} is listed twice")));
                        }
                        vary.seeds.push(i)
                    }
                    _ => {
                        return Err(at(
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
        }
        Ok(vary)
    }
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
