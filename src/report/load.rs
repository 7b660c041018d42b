//! Reads what sweeps left on disk: the leaderboard, and each run folder's status, summary
//! metrics, metrics log and generations. Everything except the inputs themselves is optional;
//! what is absent is recorded so the report can say so.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value as J;

use crate::sweep::Leaderboard;

/// A leaderboard row: column → cell.
type Row = BTreeMap<String, String>;

/// Numeric metrics, in table order.
pub const METRICS: &[&str] = &[
    "best_val_loss",
    "base_val_loss",
    "final_val_loss",
    "final_train_loss",
    "test_loss",
    "test_ppl",
    "task_score",
    "tokens_per_s",
    "peak_mem_mb",
    "gpu_mem_mb",
    "wall_s",
    "stopped_step",
];

/// Whether a larger value of `metric` is better.
pub fn higher_is_better(metric: &str) -> bool {
    matches!(metric, "task_score" | "tokens_per_s")
}

/// One generated answer (`generations.jsonl` / `base_generations.jsonl`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Generation {
    pub prompt: String,
    #[serde(default)]
    pub reference: Option<String>,
    #[serde(default)]
    pub output: String,
    #[serde(default)]
    pub seconds: Option<f64>,
    #[serde(default)]
    pub tokens: Option<f64>,
    #[serde(default)]
    pub correct: Option<bool>,
}

/// A run as found on disk.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub experiment: String,
    pub run_id: String,
    pub dir: PathBuf,
    /// `done`, `failed`, `running`, `pending`, `interrupted`, or `unknown`.
    pub state: String,
    pub error: Option<String>,
    /// One cell per key of [`Results::keys`] ("" where the run's experiment does not vary it).
    pub values: Vec<String>,
    pub seed: Option<i64>,
    pub metrics: BTreeMap<String, f64>,
    pub task_metric: Option<String>,
    /// (step, loss) from `metrics.jsonl`.
    pub train_curve: Vec<(f64, f64)>,
    pub val_curve: Vec<(f64, f64)>,
    pub has_log: bool,
    pub generations: Option<Vec<Generation>>,
}

impl Run {
    /// Finished: trained to the end, or stopped for good by `early_stop` (`pruned`).
    pub fn done(&self) -> bool {
        self.state == "done" || self.state == "pruned"
    }
}

/// An experiment folder.
#[derive(Debug, Clone, Default)]
pub struct Experiment {
    pub name: String,
    pub dir: PathBuf,
    pub base_generations: Option<Vec<Generation>>,
    /// (`task_metric`, `task_score`) from `base_metrics.json`.
    pub base_task: Option<(String, Option<f64>)>,
}

/// Everything a report is made from.
#[derive(Debug, Clone, Default)]
pub struct Results {
    /// Varied keys (every leaderboard column between `status` and `seed`), in column order.
    pub keys: Vec<String>,
    pub experiments: Vec<Experiment>,
    pub runs: Vec<Run>,
    /// Where the inputs said reports should go when `--out` is not given.
    pub default_out: PathBuf,
    /// Problems met while reading (unreadable files and the like).
    pub notes: Vec<String>,
}

/// Reads experiment folders (`results/<experiment>`) or leaderboard CSV files.
pub fn load(inputs: &[PathBuf]) -> Result<Results> {
    if inputs.is_empty() {
        bail!("give an experiment folder (results/<experiment>) or a leaderboard CSV");
    }
    let mut res = Results::default();
    for (name, dir, rows) in wanted_experiments(inputs, &mut res)? {
        load_experiment(name, dir, &rows, &mut res);
    }
    if res.runs.is_empty() {
        bail!(no_runs_message(&res.experiments));
    }
    // Keys added late (by a later experiment) leave earlier runs short: pad them.
    let n = res.keys.len();
    for r in &mut res.runs {
        r.values.resize(n, String::new());
    }
    Ok(res)
}

/// An experiment to read: its name, its folder and its leaderboard rows.
type Wanted = (String, PathBuf, Vec<Row>);

/// The experiments the inputs name, each once, in input order. Also sets
/// `res.default_out` (from the first input), the varied keys the leaderboards fill, and
/// notes for missing leaderboards.
fn wanted_experiments(inputs: &[PathBuf], res: &mut Results) -> Result<Vec<Wanted>> {
    let mut wanted: Vec<Wanted> = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        if !input.exists() {
            bail!(
                "{} does not exist; give an experiment folder such as results/<experiment>, or a leaderboard.csv",
                input.display()
            );
        }
        let (csv, out, only) = resolve_input(input);
        if i == 0 {
            res.default_out = match &only {
                Some(_) if inputs.len() == 1 => input.clone(),
                _ => out.clone(),
            };
        }
        let table = if csv.is_file() {
            Leaderboard::new(&csv).read()?
        } else {
            res.notes.push(format!(
                "no leaderboard at {}: runs were read from their folders only",
                csv.display()
            ));
            Default::default()
        };
        let mut header_keys: Vec<String> = Vec::new();
        if let (Some(s), Some(e)) = (
            table.header.iter().position(|h| h == "status"),
            table.header.iter().position(|h| h == "seed"),
        ) {
            header_keys = table.header[s + 1..e].to_vec();
        }
        let mut names = match only {
            Some(n) => vec![n],
            None => experiment_names(&table.rows),
        };
        names.retain(|n| !wanted.iter().any(|(w, _, _)| w == n));
        for name in names {
            let rows: Vec<_> = table
                .rows
                .iter()
                .filter(|r| r.get("experiment") == Some(&name))
                .cloned()
                .collect();
            // Only keys this experiment actually fills count as its varied keys.
            for k in &header_keys {
                if rows.iter().any(|r| r.get(k).is_some_and(|c| !c.is_empty()))
                    && !res.keys.contains(k)
                {
                    res.keys.push(k.clone());
                }
            }
            wanted.push((name.clone(), out.join(&name), rows));
        }
    }
    Ok(wanted)
}

/// What an input names: (leaderboard CSV, output folder, the one experiment to read or
/// `None` for every experiment in the leaderboard). An input is a CSV file, an output folder
/// holding `leaderboard.csv`, or an experiment folder inside an output folder.
fn resolve_input(input: &Path) -> (PathBuf, PathBuf, Option<String>) {
    if input.is_file() {
        let out = parent(input);
        (input.to_path_buf(), out, None)
    } else if input.join("leaderboard.csv").is_file() {
        // The output folder itself: every experiment in its leaderboard.
        (input.join("leaderboard.csv"), input.to_path_buf(), None)
    } else {
        let name = input
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let out = parent(input);
        (out.join("leaderboard.csv"), out, Some(name))
    }
}

/// The experiments a leaderboard lists, in order of first appearance.
fn experiment_names(rows: &[Row]) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for r in rows {
        if let Some(e) = r.get("experiment")
            && !v.contains(e)
        {
            v.push(e.clone());
        }
    }
    v
}

/// Reads one experiment: its baseline files, the runs its leaderboard rows list, then run
/// folders the leaderboard does not list. Appends to `res` (runs, experiment, keys, notes).
fn load_experiment(name: String, dir: PathBuf, rows: &[Row], res: &mut Results) {
    let exp = read_experiment(&name, &dir, &mut res.notes);
    let mut seen = BTreeSet::new();
    for row in rows {
        let mut run = run_from_row(&name, &dir, row, &res.keys);
        seen.insert(run.run_id.clone());
        read_folder(&mut run, &mut res.notes);
        res.runs.push(run);
    }
    let extra = unlisted_runs(&name, &dir, &seen, &mut res.notes);
    if !extra.is_empty() && rows.is_empty() {
        // No leaderboard rows: the varied keys are the config keys whose values differ.
        for k in differing_keys(&extra.iter().map(|(_, c)| c.clone()).collect::<Vec<_>>()) {
            if !res.keys.contains(&k) {
                res.keys.push(k);
            }
        }
    }
    for (mut run, config) in extra {
        run.values = res
            .keys
            .iter()
            .map(|k| {
                crate::config::keys::get_path(&config, k)
                    .map(crate::sweep::executor::cell)
                    .unwrap_or_default()
            })
            .collect();
        res.runs.push(run);
    }
    res.experiments.push(exp);
}

/// An experiment folder's own files: base-model generations and `base_metrics.json`, which
/// the report compares runs against.
fn read_experiment(name: &str, dir: &Path, notes: &mut Vec<String>) -> Experiment {
    let mut exp = Experiment {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        ..Default::default()
    };
    let base = dir.join("base_generations.jsonl");
    if base.is_file() {
        match read_generations(&base) {
            Ok(g) => exp.base_generations = Some(g),
            Err(e) => notes.push(format!("{e:#}")),
        }
    }
    if let Some(j) = read_json(&dir.join("base_metrics.json"), notes) {
        exp.base_task = Some((
            j["task_metric"].as_str().unwrap_or("task").to_string(),
            j["task_score"].as_f64(),
        ));
    }
    exp
}

/// A run as its leaderboard row describes it (state, seed, metrics, varied-key cells); the
/// run folder is read afterwards to fill what the row leaves out.
fn run_from_row(name: &str, dir: &Path, row: &Row, keys: &[String]) -> Run {
    let id = row.get("run_id").cloned().unwrap_or_default();
    let mut run = Run {
        experiment: name.to_string(),
        dir: dir.join(&id),
        run_id: id,
        state: row
            .get("status")
            .filter(|s| !s.is_empty())
            .cloned()
            .unwrap_or_else(|| "unknown".into()),
        seed: row.get("seed").and_then(|s| s.parse().ok()),
        ..Default::default()
    };
    for m in METRICS {
        if let Some(v) = row.get(*m).and_then(|c| c.trim().parse::<f64>().ok())
            && v.is_finite()
        {
            run.metrics.insert(m.to_string(), v);
        }
    }
    run.task_metric = row.get("task_metric").filter(|s| !s.is_empty()).cloned();
    run.values = keys
        .iter()
        .map(|k| row.get(k).cloned().unwrap_or_default())
        .collect();
    run
}

/// Run folders the leaderboard does not list (e.g. no leaderboard at all), in path order,
/// each with its `config.yaml` (or null) so varied keys can be recovered from configs.
fn unlisted_runs(
    name: &str,
    dir: &Path,
    seen: &BTreeSet<String>,
    notes: &mut Vec<String>,
) -> Vec<(Run, J)> {
    let mut extra: Vec<(Run, J)> = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return extra;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        let id = p.file_name().unwrap().to_string_lossy().into_owned();
        if !p.is_dir()
            || seen.contains(&id)
            || !(p.join("status.json").exists() || p.join("config.yaml").exists())
        {
            continue;
        }
        let config = read_config(&p.join("config.yaml")).unwrap_or(J::Null);
        let mut run = Run {
            experiment: name.to_string(),
            dir: p.clone(),
            run_id: id,
            state: "unknown".into(),
            seed: crate::config::keys::get_path(&config, "train.seed").and_then(|v| v.as_i64()),
            ..Default::default()
        };
        read_folder(&mut run, notes);
        extra.push((run, config));
    }
    extra
}

/// The error text when no input yields a run, naming the experiments that were looked at.
fn no_runs_message(experiments: &[Experiment]) -> String {
    let names: Vec<String> = experiments
        .iter()
        .map(|e| format!("{} ({})", e.name, e.dir.display()))
        .collect();
    format!(
        "no runs found for {}: neither the leaderboard nor the experiment folder lists any (has `tuna sweep` run?)",
        if names.is_empty() {
            "these inputs (the leaderboard is empty)".to_string()
        } else {
            names.join(", ")
        }
    )
}

fn parent(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Fills a run from its folder: status, metrics.json (for cells the CSV left empty),
/// metrics.jsonl curves, generations.
fn read_folder(run: &mut Run, notes: &mut Vec<String>) {
    if let Some(s) = read_json(&run.dir.join("status.json"), notes) {
        if let Some(state) = s["state"].as_str() {
            run.state = state.to_string();
        }
        run.error = s["error"].as_str().map(String::from);
    }
    if let Some(m) = read_json(&run.dir.join("metrics.json"), notes) {
        for name in METRICS {
            if let Some(v) = m[*name].as_f64().filter(|v| v.is_finite()) {
                run.metrics.entry(name.to_string()).or_insert(v);
            }
        }
        if run.task_metric.is_none() {
            run.task_metric = m["task_metric"].as_str().map(String::from);
        }
    }
    let log = run.dir.join("metrics.jsonl");
    if log.is_file() {
        run.has_log = true;
        for e in crate::sweep::metrics_log::read(&log) {
            let Some(step) = e["step"].as_f64() else {
                continue;
            };
            let point = |k: &str| e[k].as_f64().filter(|v| v.is_finite()).map(|v| (step, v));
            match e["kind"].as_str() {
                Some("train") => run.train_curve.extend(point("train_loss")),
                Some("val") => run.val_curve.extend(point("val_loss")),
                _ => {}
            }
        }
    }
    let gens = run.dir.join("generations.jsonl");
    if gens.is_file() {
        match read_generations(&gens) {
            Ok(g) => run.generations = Some(g),
            Err(e) => notes.push(format!("{e:#}")),
        }
    }
}

fn read_json(path: &Path, notes: &mut Vec<String>) -> Option<J> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(v) => Some(v),
        Err(e) => {
            notes.push(format!(
                "{} is not valid JSON ({e}); ignored",
                path.display()
            ));
            None
        }
    }
}

/// Reads a generations file; lines that do not parse are skipped (a torn last line).
pub fn read_generations(path: &Path) -> Result<Vec<Generation>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// A run's `config.yaml` as JSON.
fn read_config(path: &Path) -> Option<J> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_saphyr::from_str::<J>(&text).ok()
}

/// Dotted keys whose values are not the same in every config (seed, names and paths excluded).
fn differing_keys(configs: &[J]) -> Vec<String> {
    fn flatten(prefix: &str, v: &J, out: &mut BTreeMap<String, J>) {
        match v {
            J::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let flat: Vec<BTreeMap<String, J>> = configs
        .iter()
        .map(|c| {
            let mut m = BTreeMap::new();
            flatten("", c, &mut m);
            m
        })
        .collect();
    let all: BTreeSet<&String> = flat.iter().flat_map(|m| m.keys()).collect();
    all.into_iter()
        .filter(|k| {
            !matches!(
                k.as_str(),
                "train.seed" | "name" | "description" | "output.dir"
            ) && flat.windows(2).any(|w| w[0].get(*k) != w[1].get(*k))
        })
        .cloned()
        .collect()
}
