//! Varying keys and their expansion into runs.
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
use sha2::{Digest, Sha256};

use super::doc::{Doc, Node, Value};
use super::error::ConfigError;
use super::keys;
use super::schedule::{LrSchedule, Schedule};
use super::spec::{Experiment, check};

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

/// A fully resolved run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunPlan {
    pub id: String,
    /// The resolved config (paths relative to the working folder).
    pub config: J,
    /// The values this run takes for the experiment's varied keys, in axis order.
    pub varied: Vec<(String, J)>,
    pub seed: i64,
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

/// Expands an experiment into its runs, checking each resolved config.
pub fn expand(exp: &Experiment) -> Result<Vec<RunPlan>, ConfigError> {
    let mut points: Vec<Vec<(String, J)>> = vec![vec![]];
    for axis in &exp.vary.axes {
        points = points
            .into_iter()
            .flat_map(|p| {
                axis.points
                    .iter()
                    .map(move |a| [p.clone(), a.clone()].concat())
            })
            .collect();
    }
    let total = points.len();
    let mut runs = Vec::new();
    for point in points {
        let mut config = exp.base.clone();
        for (k, v) in &point {
            keys::set_path(&mut config, k, v.clone());
        }
        let excluded = exp.vary.exclude.iter().any(|(entry, _)| {
            entry
                .iter()
                .all(|(k, v)| keys::get_path(&config, k) == Some(v))
        });
        if excluded {
            continue;
        }
        let seeds = if exp.vary.seeds.is_empty() {
            vec![config["train"]["seed"].as_i64().unwrap_or(0)]
        } else {
            exp.vary.seeds.clone()
        };
        for seed in seeds {
            let mut c = config.clone();
            keys::set_path(&mut c, "train.seed", J::from(seed));
            check_run(exp, &c, &point)?;
            runs.push(RunPlan {
                id: run_id(&c),
                config: c,
                varied: point.clone(),
                seed,
            });
        }
    }
    if runs.is_empty() {
        let line = exp.vary.exclude.first().map(|(_, l)| *l).unwrap_or(0);
        return Err(ConfigError::at(
            &exp.file,
            line,
            format!("the grid is empty: all {total} points match an `exclude` entry"),
        )
        .key("exclude")
        .hint("remove or narrow an exclude entry"));
    }
    Ok(runs)
}

/// Checks that need the whole resolved config (the schedule against `iters`).
fn check_run(exp: &Experiment, c: &J, point: &[(String, J)]) -> Result<(), ConfigError> {
    lr_schedule(c).map_err(|msg| {
        let (file, line) = exp.origin("train.lr_schedule");
        let at_point = if point.is_empty() {
            String::new()
        } else {
            let vals: Vec<String> = point.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!(" (in the run with {})", vals.join(", "))
        };
        ConfigError::at(&file, line, format!("{msg}{at_point}")).key("train.lr_schedule")
    })?;
    Ok(())
}

/// The learning-rate schedule of a resolved config.
pub fn lr_schedule(c: &J) -> Result<LrSchedule, String> {
    let t = &c["train"];
    let s = Schedule::parse(t["lr_schedule"].as_str().unwrap_or("constant"))?;
    LrSchedule::new(
        s,
        t["learning_rate"].as_f64().unwrap_or(1e-5),
        t["final_lr"].as_f64().unwrap_or(0.0),
        t["warmup"].as_u64().unwrap_or(0),
        t["iters"].as_u64().unwrap_or(1000),
    )
}

/// A short stable id: the hash of the canonical resolved config. Key order and number
/// formatting in the files do not matter (values are already normalized by the catalog);
/// the name, description and output folder do not count.
pub fn run_id(config: &J) -> String {
    let mut c = config.clone();
    if let J::Object(m) = &mut c {
        m.remove("name");
        m.remove("description");
        m.remove("output");
    }
    let digest = Sha256::digest(canonical(&c).as_bytes());
    digest.iter().take(5).map(|b| format!("{b:02x}")).collect()
}

/// JSON with keys sorted at every level.
pub fn canonical(v: &J) -> String {
    match v {
        J::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .iter()
                .map(|k| format!("{}:{}", J::String((*k).clone()), canonical(&m[*k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        J::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}
