//! An experiment expanded into its runs: the cartesian product of its axes, less excluded
//! points, times its seeds; each run with its resolved config and a stable id.

use serde_json::Value as J;
use sha2::{Digest, Sha256};

use super::error::ConfigError;
use super::keys;
use super::spec::Experiment;
use crate::optim::schedule::{LrSchedule, Schedule};

/// A fully resolved run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunPlan {
    pub id: String,
    /// The resolved config (paths relative to the working folder).
    pub config: J,
    /// The values this run takes for the experiment's varied keys, in axis order.
    pub varied: Vec<(String, J)>,
    pub seed: i64,
    /// The data and model fingerprints the id covers, once `sweep::identity` has set them.
    pub fingerprints: Option<Fingerprints>,
}

/// Fingerprints of a run's inputs (12 hex digits each; `missing` for a path that does not exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprints {
    pub data: String,
    pub model: String,
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
            vec![
                keys::Resolved(&config)
                    .i64("train.seed")
                    .unwrap_or_default(),
            ]
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
                fingerprints: None,
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
    let r = keys::Resolved(c);
    let wd = r.f64("train.weight_decay").unwrap_or_default();
    if r.str("train.optimizer").unwrap_or_default() == "adam" && wd != 0.0 {
        let (file, line) = exp.origin("train.weight_decay");
        return Err(ConfigError::at(
            &file,
            line,
            format!("train.weight_decay is {wd}, but train.optimizer `adam` has no weight decay"),
        )
        .key("train.weight_decay")
        .hint("use `train.optimizer: adamw` (decoupled weight decay), or drop weight_decay"));
    }
    Ok(())
}

/// The learning-rate schedule of a resolved config.
pub fn lr_schedule(c: &J) -> Result<LrSchedule, String> {
    let r = keys::Resolved(c);
    let e = |e: anyhow::Error| e.to_string();
    let s = Schedule::parse(&r.str("train.lr_schedule").map_err(e)?)?;
    LrSchedule::new(
        s,
        r.f64("train.learning_rate").map_err(e)?,
        r.f64("train.final_lr").map_err(e)?,
        r.u64("train.warmup").map_err(e)?,
        r.u64("train.iters").map_err(e)?,
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
        // Where a run trains, and the sweep's stopping policy, are not what it is.
        m.remove("devices");
        m.remove("early_stop");
        m.remove("slurm");
        // Sections added after runs already existed count only when set, so that those runs
        // keep their ids (and a new sweep still finds them done).
        for (section, off) in [("quantize", "bits")] {
            if m.get(section).and_then(|s| s.get(off)) == Some(&J::from(0)) {
                m.remove(section);
            }
        }
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
