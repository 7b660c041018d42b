//! Turns [`Results`] into report blocks: leaderboard by setting, effects, A/B, curves,
//! answers, and what is missing.

use std::collections::BTreeMap;

use anyhow::{Result, bail};

use super::chart::{Series, line_chart};
use super::doc::{Block, Table};
use super::load::{Experiment, Generation, METRICS, Results, Run, higher_is_better};
use super::stats::{self, Summary};

/// Prompts shown with their answers (the rest are counted, not shown).
pub const MAX_PROMPTS: usize = 12;

/// Runs that share every varied setting except the seed.
#[derive(Debug, Clone)]
pub struct Group {
    pub experiment: String,
    pub values: Vec<String>,
    pub label: String,
    /// Indices into `Results::runs`.
    pub runs: Vec<usize>,
}

/// A built report.
#[derive(Debug, Clone)]
pub struct Built {
    pub title: String,
    pub blocks: Vec<Block>,
    /// A few lines for the terminal.
    pub summary: String,
    /// The winning group's label, if any group has the metric.
    pub winner: Option<String>,
}

/// The groups of a result set, in first-seen order.
pub fn groups(res: &Results) -> Vec<Group> {
    let multi = res.experiments.len() > 1;
    let mut out: Vec<Group> = Vec::new();
    for (i, r) in res.runs.iter().enumerate() {
        if let Some(g) = out
            .iter_mut()
            .find(|g| g.experiment == r.experiment && g.values == r.values)
        {
            g.runs.push(i);
            continue;
        }
        let settings = settings_label(&res.keys, &r.values);
        let label = match (multi, settings.is_empty()) {
            (true, true) => r.experiment.clone(),
            (true, false) => format!("{}: {settings}", r.experiment),
            (false, true) => "(no varied keys)".to_string(),
            (false, false) => settings,
        };
        out.push(Group {
            experiment: r.experiment.clone(),
            values: r.values.clone(),
            label,
            runs: vec![i],
        });
    }
    out
}

fn settings_label(keys: &[String], values: &[String]) -> String {
    keys.iter()
        .zip(values)
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The values of `metric` over the done runs among `runs`.
pub fn metric_values(res: &Results, runs: &[usize], metric: &str) -> Vec<f64> {
    runs.iter()
        .map(|&i| &res.runs[i])
        .filter(|r| r.done())
        .filter_map(|r| r.metrics.get(metric).copied())
        .collect()
}

/// A number for a table: 4 decimals for everyday magnitudes, fewer for large ones.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    let a = x.abs();
    if x.fract() == 0.0 && a < 1e9 {
        format!("{x:.0}")
    } else if a >= 1000.0 {
        format!("{x:.1}")
    } else if a >= 1e-3 {
        format!("{x:.4}")
    } else {
        format!("{x:.3e}")
    }
}

fn p_value(p: f64) -> String {
    if p >= 1e-3 {
        format!("{p:.4}")
    } else {
        format!("{p:.2e}")
    }
}

fn mean_std(s: &Summary) -> String {
    match s.std {
        Some(sd) => format!("{} ± {}", num(s.mean), num(sd)),
        None => num(s.mean),
    }
}

fn run_label(g: &Group, r: &Run) -> String {
    match r.seed {
        Some(s) => format!("{} · seed {s}", g.label),
        None => format!("{} · {}", g.label, r.run_id),
    }
}

/// Builds the report for `metric`, with an A/B section for `compare` (`KEY=A,B` or
/// `RUNID,RUNID`; by default the winner against the runner-up).
pub fn build(res: &Results, metric: &str, compare: Option<&str>) -> Result<Built> {
    if !METRICS.contains(&metric) {
        bail!(
            "unknown metric `{metric}`; choose one of {}",
            METRICS.join(", ")
        );
    }
    let r = Ranked::new(res, metric);
    let exp_names: Vec<&str> = res.experiments.iter().map(|e| e.name.as_str()).collect();
    let title = format!("tuna report: {}", exp_names.join(", "));
    let status_line = status_line(res);
    let winner_line = r.winner_line();
    let mut blocks = vec![
        Block::Para(format!(
            "{status_line}. Runs are grouped by their varied settings (every varied key except the seed); seeds are aggregated as mean ± sample std over finished runs. Ranked by `{metric}` ({}).",
            r.dir_word()
        )),
        Block::Para(winner_line.clone()),
    ];
    let missing = missing(res, &r.groups, metric);
    blocks.extend(missing_section(&missing));
    blocks.extend(leaderboard(&r));
    blocks.extend(effects(&r));
    if let Some((a, b, note)) = ab_sides(&r, compare)? {
        blocks.extend(ab_section(res, metric, &a, &b, note, compare.is_none()));
    }
    blocks.extend(curves(res, &r.groups));
    blocks.extend(answers(res, &r.groups));
    blocks.extend(all_runs(res, metric));
    let summary = terminal_summary(&title, &status_line, &winner_line, &missing);
    Ok(Built {
        title,
        blocks,
        summary,
        winner: r.winner.map(|gi| r.groups[gi].label.clone()),
    })
}

/// The groups ranked by the metric, computed once because the leaderboard, the winner line
/// and the default A/B pair must all agree on the same order.
struct Ranked<'a> {
    res: &'a Results,
    metric: &'a str,
    higher: bool,
    groups: Vec<Group>,
    /// Mean of the metric per group; `None` where no finished run has it.
    means: Vec<Option<f64>>,
    /// Group indices: those with the metric first, best first.
    order: Vec<usize>,
    winner: Option<usize>,
}

impl<'a> Ranked<'a> {
    fn new(res: &'a Results, metric: &'a str) -> Self {
        let higher = higher_is_better(metric);
        let groups = groups(res);
        let means: Vec<Option<f64>> = groups
            .iter()
            .map(|g| stats::summarize(&metric_values(res, &g.runs, metric)).map(|s| s.mean))
            .collect();
        // With early stopping, runs are compared only on what both reached: a group stopped
        // earlier ranks below every group that went further (it lost at a rung they passed).
        let reach: Vec<f64> = groups
            .iter()
            .map(|g| {
                g.runs
                    .iter()
                    .filter_map(|&i| res.runs[i].metrics.get("stopped_step").copied())
                    .fold(f64::INFINITY, f64::min)
            })
            .collect();
        let mut order: Vec<usize> = (0..groups.len()).collect();
        order.sort_by(|a, b| {
            reach[*b]
                .partial_cmp(&reach[*a])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then_with(|| match (means[*a], means[*b]) {
                    (Some(x), Some(y)) => {
                        let c = x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal);
                        if higher { c.reverse() } else { c }
                    }
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (None, None) => std::cmp::Ordering::Equal,
                })
        });
        let winner = order.first().copied().filter(|gi| means[*gi].is_some());
        Self {
            res,
            metric,
            higher,
            groups,
            means,
            order,
            winner,
        }
    }

    fn stats(&self, g: &Group, m: &str) -> Option<Summary> {
        stats::summarize(&metric_values(self.res, &g.runs, m))
    }

    fn dir_word(&self) -> &'static str {
        if self.higher {
            "higher is better"
        } else {
            "lower is better"
        }
    }

    /// The headline; it warns about a single seed because a winner without spread may be luck.
    fn winner_line(&self) -> String {
        let metric = self.metric;
        let Some(gi) = self.winner else {
            return format!("No winner: no finished run has `{metric}`.");
        };
        let s = self.stats(&self.groups[gi], metric).unwrap();
        format!(
            "**Winner: {}** with {metric} {} (n={} seed(s); {}).{}",
            self.groups[gi].label,
            mean_std(&s),
            s.n,
            self.dir_word(),
            if s.n == 1 {
                " Only one seed: its spread is unknown, so treat the ranking with care."
            } else {
                ""
            }
        )
    }
}

/// How many runs the report rests on, so unfinished ones are never silently dropped.
fn status_line(res: &Results) -> String {
    let n_runs = res.runs.len();
    let count = |s: &str| res.runs.iter().filter(|r| r.state == s).count();
    let (n_done, n_failed) = (count("done"), count("failed"));
    let n_other = n_runs - n_done - n_failed;
    let mut line = format!(
        "{n_runs} run(s) in {} experiment(s): {n_done} done, {n_failed} failed",
        res.experiments.len()
    );
    if n_other > 0 {
        line.push_str(&format!(
            ", {n_other} not finished (running, pending, interrupted or unknown)"
        ));
    }
    line
}

/// Put before the results so a reader knows what the numbers below leave out.
fn missing_section(missing: &[String]) -> Vec<Block> {
    let body = if missing.is_empty() {
        Block::Para("Nothing: every run finished with every metric, curves and answers.".into())
    } else {
        Block::List(missing.to_vec())
    };
    vec![Block::Heading(2, "What is missing".into()), body]
}

/// One row per setting with seeds aggregated, so the winner's margin can be judged against
/// its spread and against the other metrics.
fn leaderboard(r: &Ranked) -> Vec<Block> {
    let (res, metric) = (r.res, r.metric);
    let others: Vec<&str> = METRICS
        .iter()
        .copied()
        .filter(|m| {
            *m != metric
                && res
                    .runs
                    .iter()
                    .any(|r| r.done() && r.metrics.contains_key(*m))
        })
        .collect();
    let multi = res.experiments.len() > 1;
    let mut t = Table {
        class: "leaderboard",
        ..Default::default()
    };
    t.header.push("rank".into());
    if multi {
        t.header.push("experiment".into());
    }
    t.header.extend(res.keys.iter().cloned());
    t.header.push(format!("{metric} (mean ± std)"));
    t.header.push("n".into());
    t.header.extend(others.iter().map(|m| m.to_string()));
    t.header.push("seeds".into());
    t.header.push("notes".into());
    for (rank, &gi) in r.order.iter().enumerate() {
        if Some(gi) == r.winner {
            t.highlight.push(t.rows.len());
        }
        t.rows.push(leaderboard_row(r, rank, gi, &others));
    }
    let mut out = vec![Block::Heading(2, "Leaderboard".into()), Block::Table(t)];
    if res.runs.iter().any(|r| r.state == "pruned") {
        out.push(Block::Para(
            "Some runs were stopped early (`early_stop`, status `pruned`, step in `stopped_step`). \
             Runs are compared only on what both reached: a run stopped at a rung ranks below every \
             run that went past it, and runs stopped at the same step are ranked by the metric."
                .into(),
        ));
    }
    out
}

/// A row with the seeds listed, unfinished ones marked, so a mean is never taken on trust.
fn leaderboard_row(r: &Ranked, rank: usize, gi: usize, others: &[&str]) -> Vec<String> {
    let (res, metric) = (r.res, r.metric);
    let g = &r.groups[gi];
    let mut row = Vec::new();
    row.push(if Some(gi) == r.winner {
        "1 ★ winner".to_string()
    } else if r.means[gi].is_some() {
        (rank + 1).to_string()
    } else {
        "–".into()
    });
    if res.experiments.len() > 1 {
        row.push(g.experiment.clone());
    }
    row.extend(g.values.iter().cloned());
    match r.stats(g, metric) {
        Some(s) => {
            row.push(mean_std(&s));
            row.push(s.n.to_string());
        }
        None => {
            row.push("not measured".into());
            row.push("0".into());
        }
    }
    for m in others {
        row.push(r.stats(g, m).map(|s| mean_std(&s)).unwrap_or_default());
    }
    let seeds: Vec<String> = g
        .runs
        .iter()
        .map(|&i| &res.runs[i])
        .map(|r| {
            let s = r.seed.map(|s| s.to_string()).unwrap_or_else(|| "?".into());
            if r.done() {
                s
            } else {
                format!("{s} ({})", r.state)
            }
        })
        .collect();
    row.push(seeds.join(", "));
    row.push(group_notes(res, g, metric));
    row
}

/// Marginal means per value of each key: the leaderboard ranks settings, this shows which
/// key actually moves the metric.
fn effects(r: &Ranked) -> Vec<Block> {
    let metric = r.metric;
    let mut blocks = vec![
        Block::Heading(2, format!("Effects on {metric}")),
        Block::Para(format!(
            "For each varied key, the mean of `{metric}` over every finished run with that value (marginal over the other keys and seeds)."
        )),
    ];
    let before = blocks.len();
    for (ki, k) in r.res.keys.iter().enumerate() {
        blocks.extend(key_effect(r, ki, k));
    }
    if blocks.len() == before {
        blocks.push(Block::Para("No varied keys: nothing to compare.".into()));
    }
    blocks
}

/// The table for one key; empty when no run sets it.
fn key_effect(r: &Ranked, ki: usize, k: &str) -> Vec<Block> {
    let (res, metric) = (r.res, r.metric);
    let mut values: Vec<String> = Vec::new();
    for run in &res.runs {
        let v = &run.values[ki];
        if !v.is_empty() && !values.contains(v) {
            values.push(v.clone());
        }
    }
    if values.is_empty() {
        return Vec::new();
    }
    sort_values(&mut values);
    let rows: Vec<(String, Option<Summary>)> = values
        .iter()
        .map(|v| {
            let runs: Vec<usize> = (0..res.runs.len())
                .filter(|&i| &res.runs[i].values[ki] == v)
                .collect();
            (
                v.clone(),
                stats::summarize(&metric_values(res, &runs, metric)),
            )
        })
        .collect();
    let best =
        rows.iter()
            .filter_map(|(_, s)| s.map(|s| s.mean))
            .fold(None, |acc: Option<f64>, m| match acc {
                None => Some(m),
                Some(a) => Some(if (m < a) != r.higher { m } else { a }),
            });
    let mut t = Table {
        header: vec![
            k.to_string(),
            "runs".into(),
            format!("mean {metric} ± std"),
            "vs best value".into(),
        ],
        class: "effects",
        ..Default::default()
    };
    for (v, s) in rows {
        if let (Some(s), Some(b)) = (s, best) {
            if s.mean == b {
                t.highlight.push(t.rows.len());
            }
            t.rows.push(vec![
                v,
                s.n.to_string(),
                mean_std(&s),
                if s.mean == b {
                    "best".into()
                } else {
                    format!("{:+.4}", s.mean - b)
                },
            ]);
        } else {
            t.rows
                .push(vec![v, "0".into(), "not measured".into(), String::new()]);
        }
    }
    vec![Block::Heading(3, format!("`{k}`")), Block::Table(t)]
}

/// The pair `--compare` names, or else the winner against the runner-up, since that is the
/// ranking a reader most needs to trust; `None` when fewer than two settings are ranked.
fn ab_sides(r: &Ranked, compare: Option<&str>) -> Result<Option<(Side, Side, Option<String>)>> {
    if let Some(spec) = compare {
        let group_of: BTreeMap<usize, usize> = r
            .groups
            .iter()
            .enumerate()
            .flat_map(|(gi, g)| g.runs.iter().map(move |&run| (run, gi)))
            .collect();
        return sides(r.res, &r.groups, &group_of, spec).map(Some);
    }
    let ranked: Vec<usize> = r
        .order
        .iter()
        .copied()
        .filter(|gi| r.means[*gi].is_some())
        .collect();
    Ok((ranked.len() >= 2).then(|| {
        let side = |gi: usize| Side {
            label: r.groups[gi].label.clone(),
            runs: r.groups[gi].runs.clone(),
        };
        (side(ranked[0]), side(ranked[1]), None)
    }))
}

/// Every run's curve, coloured by setting, so a diverging or noisy seed stands out.
fn curves(res: &Results, groups: &[Group]) -> Vec<Block> {
    let mut blocks = vec![Block::Heading(2, "Loss curves".into())];
    for exp in &res.experiments {
        let mut train = Vec::new();
        let mut val = Vec::new();
        for (gi, g) in groups.iter().enumerate() {
            if g.experiment != exp.name {
                continue;
            }
            for &i in &g.runs {
                let r = &res.runs[i];
                train.push(Series {
                    label: g.label.clone(),
                    color: gi,
                    markers: false,
                    points: r.train_curve.clone(),
                });
                val.push(Series {
                    label: g.label.clone(),
                    color: gi,
                    markers: true,
                    points: r.val_curve.clone(),
                });
            }
        }
        let slug = slug(&exp.name);
        let mut drew = false;
        for (what, series, y) in [("train", &train, "train loss"), ("val", &val, "val loss")] {
            let title = format!("{}: {y} per run (one color per setting)", exp.name);
            if let Some(svg) = line_chart(&title, y, series) {
                blocks.push(Block::Chart {
                    name: format!("{slug}-{what}"),
                    title,
                    svg,
                });
                drew = true;
            }
        }
        if !drew {
            blocks.push(Block::Para(format!(
                "{}: no run has a metrics.jsonl with losses, so there are no curves.",
                exp.name
            )));
        }
    }
    blocks
}

/// Every run, failed ones included, so any number above can be traced to its run folder.
fn all_runs(res: &Results, metric: &str) -> Vec<Block> {
    let multi = res.experiments.len() > 1;
    let mut t = Table {
        class: "runs",
        ..Default::default()
    };
    t.header = vec!["run".into()];
    if multi {
        t.header.push("experiment".into());
    }
    t.header.extend(res.keys.iter().cloned());
    t.header.extend([
        "seed".into(),
        "status".into(),
        metric.to_string(),
        "error".into(),
    ]);
    for r in &res.runs {
        let mut row = vec![format!("`{}`", r.run_id)];
        if multi {
            row.push(r.experiment.clone());
        }
        row.extend(r.values.iter().cloned());
        row.push(r.seed.map(|s| s.to_string()).unwrap_or_default());
        row.push(r.state.clone());
        row.push(
            r.metrics
                .get(metric)
                .map(|v| num(*v))
                .unwrap_or_else(|| "missing".into()),
        );
        row.push(r.error.clone().unwrap_or_default());
        t.rows.push(row);
    }
    vec![Block::Heading(2, "All runs".into()), Block::Table(t)]
}

/// The terminal gets the headline and the first gaps only; the report has the rest.
fn terminal_summary(
    title: &str,
    status_line: &str,
    winner_line: &str,
    missing: &[String],
) -> String {
    let mut summary = format!("{}\n{status_line}\n", title);
    summary.push_str(&winner_line.replace("**", ""));
    summary.push('\n');
    if missing.is_empty() {
        summary.push_str("missing: nothing\n");
    } else {
        summary.push_str("missing:\n");
        for m in missing.iter().take(6) {
            summary.push_str(&format!("  - {}\n", m.replace('`', "")));
        }
        if missing.len() > 6 {
            summary.push_str(&format!(
                "  … and {} more (see the report)\n",
                missing.len() - 6
            ));
        }
    }
    summary
}

/// Sorts values numerically when they all are numbers, else as text.
fn sort_values(values: &mut [String]) {
    if values.iter().all(|v| v.parse::<f64>().is_ok()) {
        values.sort_by(|a, b| {
            a.parse::<f64>()
                .unwrap()
                .partial_cmp(&b.parse::<f64>().unwrap())
                .unwrap_or(std::cmp::Ordering::Equal)
        });
    }
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn group_notes(res: &Results, g: &Group, metric: &str) -> String {
    let runs: Vec<&Run> = g.runs.iter().map(|&i| &res.runs[i]).collect();
    let mut notes = Vec::new();
    let failed = runs.iter().filter(|r| r.state == "failed").count();
    if failed > 0 {
        notes.push(format!("{failed} failed"));
    }
    let unfinished = runs
        .iter()
        .filter(|r| !r.done() && r.state != "failed")
        .count();
    if unfinished > 0 {
        notes.push(format!("{unfinished} not finished"));
    }
    let lacking = runs
        .iter()
        .filter(|r| r.done() && !r.metrics.contains_key(metric))
        .count();
    if lacking > 0 {
        notes.push(format!("{lacking} done without {metric}"));
    }
    let n = metric_values(res, &g.runs, metric).len();
    if n == 1 {
        notes.push("single seed: no std".into());
    }
    notes.join("; ")
}

/// Everything a reader should know is absent: a gap named is better than a gap guessed.
fn missing(res: &Results, groups: &[Group], metric: &str) -> Vec<String> {
    let mut out = missing_runs(res, groups, metric);
    out.extend(missing_files(res, metric));
    out.extend(res.notes.iter().cloned());
    out
}

/// Runs that did not finish, lack the metric, or stand alone without a second seed.
fn missing_runs(res: &Results, groups: &[Group], metric: &str) -> Vec<String> {
    let mut out = Vec::new();
    let gl = |i: usize| {
        groups
            .iter()
            .find(|g| g.runs.contains(&i))
            .map(|g| g.label.clone())
            .unwrap_or_default()
    };
    let seed = |r: &Run| r.seed.map(|s| format!(", seed {s}")).unwrap_or_default();
    for (i, r) in res.runs.iter().enumerate() {
        match r.state.as_str() {
            "done" => {}
            "failed" => out.push(format!(
                "run `{}` ({}{}) failed: {}",
                r.run_id,
                gl(i),
                seed(r),
                r.error.as_deref().unwrap_or("no error message recorded")
            )),
            s => out.push(format!(
                "run `{}` ({}{}) is {s}: not counted",
                r.run_id,
                gl(i),
                seed(r)
            )),
        }
    }
    for (i, r) in res.runs.iter().enumerate() {
        if r.done() && !r.metrics.contains_key(metric) {
            out.push(format!(
                "run `{}` ({}{}) is done but has no {metric}{}",
                r.run_id,
                gl(i),
                seed(r),
                if r.metrics.is_empty() {
                    " (no metrics at all)"
                } else {
                    ""
                }
            ));
        }
    }
    let single: Vec<&str> = groups
        .iter()
        .filter(|g| metric_values(res, &g.runs, metric).len() == 1)
        .map(|g| g.label.as_str())
        .collect();
    match single.as_slice() {
        [] => {}
        [one] => out.push(format!(
            "{one} has a single seed with {metric}: no std, no interval, no t-test"
        )),
        many => out.push(format!(
            "{} settings have a single seed with {metric} (no std, no interval, no t-test): {}",
            many.len(),
            many.join("; ")
        )),
    }
    out
}

/// Files whose absence empties a section: loss logs, answers, base-model scores.
fn missing_files(res: &Results, metric: &str) -> Vec<String> {
    let mut out = Vec::new();
    let no_log: Vec<String> = res
        .runs
        .iter()
        .filter(|r| r.done() && !r.has_log)
        .map(|r| format!("`{}`", r.run_id))
        .collect();
    if !no_log.is_empty() {
        out.push(format!(
            "no metrics.jsonl (no loss curves) for {} done run(s): {}",
            no_log.len(),
            no_log.join(", ")
        ));
    }
    for e in &res.experiments {
        if e.base_generations.is_none() {
            out.push(format!(
                "{}: no base_generations.jsonl (no base-model answers to compare with)",
                e.name
            ));
        }
        if e.base_task.is_none() {
            out.push(format!(
                "{}: no base_metrics.json (no base-model task score)",
                e.name
            ));
        }
        let no_gen: Vec<String> = res
            .runs
            .iter()
            .filter(|r| r.experiment == e.name && r.done() && r.generations.is_none())
            .map(|r| format!("`{}`", r.run_id))
            .collect();
        if !no_gen.is_empty() {
            out.push(format!(
                "{}: no generations.jsonl for {} done run(s): {}",
                e.name,
                no_gen.len(),
                no_gen.join(", ")
            ));
        }
    }
    if metric != "task_score"
        && !res
            .runs
            .iter()
            .any(|r| r.metrics.contains_key("task_score"))
    {
        out.push("no run has a task_score (no task metric was configured or scored)".into());
    }
    out
}

/// One side of an A/B comparison.
#[derive(Debug, Clone)]
pub struct Side {
    pub label: String,
    pub runs: Vec<usize>,
}

/// Whether two cells name the same value (`2e-5` and `0.00002` do).
fn same_value(a: &str, b: &str) -> bool {
    a == b || matches!((a.trim().parse::<f64>(), b.trim().parse::<f64>()), (Ok(x), Ok(y)) if x == y)
}

/// The two sides of `--compare KEY=A,B` or `--compare RUNID,RUNID`.
pub fn sides(
    res: &Results,
    groups: &[Group],
    group_of: &BTreeMap<usize, usize>,
    spec: &str,
) -> Result<(Side, Side, Option<String>)> {
    if let Some((k, vals)) = spec.split_once('=') {
        let k = k.trim();
        let ki = match res.keys.iter().position(|x| x == k) {
            Some(i) => i,
            None => {
                let hits: Vec<usize> = (0..res.keys.len())
                    .filter(|&i| res.keys[i].ends_with(&format!(".{k}")))
                    .collect();
                match hits.as_slice() {
                    [i] => *i,
                    _ => bail!(
                        "--compare {spec}: `{k}` is not a varied key; varied keys: {}",
                        if res.keys.is_empty() {
                            "none".to_string()
                        } else {
                            res.keys.join(", ")
                        }
                    ),
                }
            }
        };
        let key = &res.keys[ki];
        let Some((va, vb)) = vals.split_once(',') else {
            bail!("--compare {spec}: write KEY=A,B (two values separated by a comma)");
        };
        let side = |v: &str| -> Result<Side> {
            let runs: Vec<usize> = (0..res.runs.len())
                .filter(|&i| same_value(&res.runs[i].values[ki], v.trim()))
                .collect();
            if runs.is_empty() {
                let mut seen: Vec<String> = res.runs.iter().map(|r| r.values[ki].clone()).collect();
                seen.sort();
                seen.dedup();
                bail!(
                    "--compare {spec}: no run has {key}={}; its values are {}",
                    v.trim(),
                    seen.join(", ")
                );
            }
            Ok(Side {
                label: format!("{key}={}", v.trim()),
                runs,
            })
        };
        let (a, b) = (side(va)?, side(vb)?);
        let others: Vec<&String> = res.keys.iter().filter(|x| *x != key).collect();
        let note = (!others.is_empty()).then(|| {
            format!(
                "Each side pools every run with that value, marginal over {}.",
                others
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
        return Ok((a, b, note));
    }
    let ids: Vec<&str> = spec.split(',').map(str::trim).collect();
    if ids.len() != 2 || ids.iter().any(|s| s.is_empty()) {
        bail!("--compare {spec}: write KEY=A,B or RUNID,RUNID");
    }
    let side = |id: &str| -> Result<Side> {
        let hits: Vec<usize> = (0..res.runs.len())
            .filter(|&i| res.runs[i].run_id.starts_with(id))
            .collect();
        let i = match hits.as_slice() {
            [i] => *i,
            [] => bail!("--compare {spec}: no run id starts with `{id}`"),
            _ => bail!(
                "--compare {spec}: `{id}` matches {} runs; give more of the id",
                hits.len()
            ),
        };
        let g = &groups[group_of[&i]];
        Ok(Side {
            label: format!("{} (run {} and its seeds)", g.label, res.runs[i].run_id),
            runs: g.runs.clone(),
        })
    };
    Ok((
        side(ids[0])?,
        side(ids[1])?,
        Some("A run id stands for its setting: every seed run with the same varied values.".into()),
    ))
}

/// Welch's test rather than a bare difference, because two seeds a side can differ by noise
/// alone; the curves follow so a reader can see where the sides part.
fn ab_section(
    res: &Results,
    metric: &str,
    a: &Side,
    b: &Side,
    note: Option<String>,
    auto: bool,
) -> Vec<Block> {
    let mut blocks = vec![Block::Heading(
        2,
        format!("A/B: {} vs {}", a.label, b.label),
    )];
    let mut intro = format!(
        "A = {}, B = {}. Differences are B − A; the 95% interval and the two-sided p-value come from Welch's t-test (unequal variances, Welch–Satterthwaite df) and need at least 2 finished seeds per side.",
        a.label, b.label
    );
    if auto {
        intro = format!(
            "The winner (A) against the runner-up (B) by `{metric}` (choose another pair with `--compare KEY=A,B` or `--compare RUNID,RUNID`). {intro}"
        );
    }
    if let Some(n) = note {
        intro.push(' ');
        intro.push_str(&n);
    }
    blocks.push(Block::Para(intro));
    let t = ab_table(res, a, b);
    if t.rows.is_empty() {
        blocks.push(Block::Para(
            "Neither side has a finished run with metrics.".into(),
        ));
    } else {
        blocks.push(Block::Table(t));
    }
    blocks.extend(ab_charts(res, a, b));
    blocks
}

/// One row per metric either side has, so a win on the ranking metric can be weighed
/// against a loss elsewhere.
fn ab_table(res: &Results, a: &Side, b: &Side) -> Table {
    let mut t = Table {
        header: vec![
            "metric".into(),
            "A mean ± std (n)".into(),
            "B mean ± std (n)".into(),
            "B − A".into(),
            "95% CI".into(),
            "t".into(),
            "df".into(),
            "p".into(),
            "better".into(),
        ],
        class: "ab",
        ..Default::default()
    };
    for m in METRICS {
        let va = metric_values(res, &a.runs, m);
        let vb = metric_values(res, &b.runs, m);
        if va.is_empty() && vb.is_empty() {
            continue;
        }
        t.rows.push(ab_row(m, &va, &vb));
    }
    t
}

/// The "better" column follows each metric's own direction, not the ranking metric's.
fn ab_row(m: &str, va: &[f64], vb: &[f64]) -> Vec<String> {
    let side = |v: &[f64]| match stats::summarize(v) {
        Some(s) => format!("{} ({})", mean_std(&s), s.n),
        None => "not measured".into(),
    };
    let mut row = vec![m.to_string(), side(va), side(vb)];
    let (ma, mb) = (stats::mean(va), stats::mean(vb));
    match (ma, mb) {
        (Some(x), Some(y)) => row.push(format!("{:+.4}", y - x)),
        _ => row.push(String::new()),
    }
    match stats::welch(va, vb) {
        Some(w) => {
            row.push(format!("[{}, {}]", num(w.ci_low), num(w.ci_high)));
            row.push(format!("{:.3}", w.t));
            row.push(format!("{:.2}", w.df));
            row.push(p_value(w.p));
        }
        None => {
            let why = if va.len() < 2 || vb.len() < 2 {
                "needs ≥2 seeds per side"
            } else {
                "no variance"
            };
            row.push(why.into());
            row.extend([String::new(), String::new(), String::new()]);
        }
    }
    row.push(match (ma, mb) {
        (Some(x), Some(y)) if x != y => if (y > x) == higher_is_better(m) {
            "B"
        } else {
            "A"
        }
        .into(),
        (Some(_), Some(_)) => "tie".into(),
        _ => String::new(),
    });
    row
}

/// The two sides' curves in two colours only, so A and B are told apart at a glance.
fn ab_charts(res: &Results, a: &Side, b: &Side) -> Vec<Block> {
    let mut blocks = Vec::new();
    for (what, y) in [("train", "train loss"), ("val", "val loss")] {
        let mut series = Vec::new();
        for (ci, s) in [a, b].iter().enumerate() {
            for &i in &s.runs {
                let r = &res.runs[i];
                series.push(Series {
                    label: format!("{} {}", ["A", "B"][ci], s.label),
                    color: ci,
                    markers: what == "val",
                    points: if what == "train" {
                        r.train_curve.clone()
                    } else {
                        r.val_curve.clone()
                    },
                });
            }
        }
        let title = format!("A/B: {y}");
        if let Some(svg) = line_chart(&title, y, &series) {
            blocks.push(Block::Chart {
                name: format!("ab-{what}"),
                title,
                svg,
            });
        }
    }
    blocks
}

fn gen_stats(g: &[Generation]) -> (Option<f64>, Option<f64>, Option<f64>) {
    let secs: Vec<f64> = g.iter().filter_map(|x| x.seconds).collect();
    let toks: Vec<f64> = g.iter().filter_map(|x| x.tokens).collect();
    let rate = (!secs.is_empty() && secs.iter().sum::<f64>() > 0.0 && toks.len() == secs.len())
        .then(|| toks.iter().sum::<f64>() / secs.iter().sum::<f64>());
    (stats::mean(&secs), stats::mean(&toks), rate)
}

fn opt(x: Option<f64>) -> String {
    x.map(num).unwrap_or_else(|| "–".into())
}

/// A model's answers with the label they are shown under (`base` or a run).
type Answers<'a> = (String, &'a Vec<Generation>);

/// Loss alone does not say whether fine-tuning helped: the task score and the answers
/// themselves, next to the base model's, do.
fn answers(res: &Results, groups: &[Group]) -> Vec<Block> {
    let mut blocks = vec![
        Block::Heading(2, "Answers: base model vs fine-tuned".into()),
        Block::Para(
            "Each run answers with its final adapter (`adapter/`, the last step). The adapter with \
             the lowest validation loss after step 0 is kept beside it as `adapter-best/`; the \
             leaderboard's `best_val_step` says which step that was."
                .into(),
        ),
    ];
    for exp in &res.experiments {
        let sub = |what: &str| {
            if res.experiments.len() > 1 {
                Block::Heading(3, format!("{}: {what}", exp.name))
            } else {
                Block::Heading(3, what.to_string())
            }
        };
        let exp_groups: Vec<&Group> = groups.iter().filter(|g| g.experiment == exp.name).collect();
        blocks.push(sub("Task metric: base vs fine-tuned"));
        blocks.push(task_scores(res, exp, &exp_groups));

        blocks.push(sub("Generation time and length"));
        let mut all: Vec<Answers> = Vec::new();
        if let Some(b) = &exp.base_generations {
            all.push(("base".into(), b));
        }
        for g in &exp_groups {
            for &i in &g.runs {
                let r = &res.runs[i];
                if let (true, Some(gens)) = (r.done(), &r.generations) {
                    all.push((run_label(g, r), gens));
                }
            }
        }
        if all.is_empty() {
            blocks.push(Block::Para(format!(
                "{}: no generations.jsonl or base_generations.jsonl: no answers to show.",
                exp.name
            )));
            continue;
        }
        blocks.push(Block::Table(speed_table(&all)));
        if exp.base_generations.is_none() {
            blocks.push(Block::Para(
                "No base_generations.jsonl: the base model's answers are missing below.".into(),
            ));
        }

        blocks.push(sub("Answers per prompt"));
        blocks.extend(per_prompt(exp, &all));
    }
    blocks
}

/// The base model's task score first, so each setting's gain is read against it.
fn task_scores(res: &Results, exp: &Experiment, exp_groups: &[&Group]) -> Block {
    let metric_name = exp.base_task.as_ref().map(|(m, _)| m.clone()).or_else(|| {
        res.runs
            .iter()
            .filter(|r| r.experiment == exp.name)
            .find_map(|r| r.task_metric.clone())
    });
    let base_score = exp.base_task.as_ref().and_then(|(_, s)| *s);
    let any_score = exp_groups
        .iter()
        .any(|g| !metric_values(res, &g.runs, "task_score").is_empty());
    if base_score.is_none() && !any_score {
        return Block::Para(format!(
            "{}: no task score for the base model or any run.",
            exp.name
        ));
    }
    let mut t = Table {
        header: vec![
            "model".into(),
            format!(
                "task score ({})",
                metric_name.clone().unwrap_or("task".into())
            ),
            "n".into(),
            "vs base".into(),
        ],
        class: "task",
        ..Default::default()
    };
    t.rows.push(vec![
        "base".into(),
        base_score
            .map(num)
            .unwrap_or_else(|| "missing (no base_metrics.json score)".into()),
        String::new(),
        String::new(),
    ]);
    for g in exp_groups {
        let s = stats::summarize(&metric_values(res, &g.runs, "task_score"));
        t.rows.push(vec![
            g.label.clone(),
            s.map(|s| mean_std(&s)).unwrap_or_else(|| "missing".into()),
            s.map(|s| s.n.to_string()).unwrap_or_default(),
            match (s, base_score) {
                (Some(s), Some(b)) => format!("{:+.4}", s.mean - b),
                _ => String::new(),
            },
        ]);
    }
    Block::Table(t)
}

/// Time and length per model: a tuned model that rambles or stalls shows here first.
fn speed_table(all: &[Answers]) -> Table {
    let mut t = Table {
        header: vec![
            "model".into(),
            "answers".into(),
            "mean seconds".into(),
            "mean tokens".into(),
            "tokens/s".into(),
            "correct".into(),
        ],
        class: "speed",
        ..Default::default()
    };
    let correct = |g: &[Generation]| {
        let scored: Vec<bool> = g.iter().filter_map(|x| x.correct).collect();
        if scored.is_empty() {
            "–".to_string()
        } else {
            format!("{}/{}", scored.iter().filter(|c| **c).count(), scored.len())
        }
    };
    for (label, g) in all {
        let (s, k, rate) = gen_stats(g);
        t.rows.push(vec![
            label.clone(),
            g.len().to_string(),
            opt(s),
            opt(k),
            opt(rate),
            correct(g),
        ]);
    }
    t
}

/// Each prompt with every model's answer side by side, capped at [`MAX_PROMPTS`] to keep
/// the page readable.
fn per_prompt(exp: &Experiment, all: &[Answers]) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut prompts: Vec<(String, Option<String>)> = Vec::new();
    for (_, g) in all {
        for x in g.iter() {
            if !prompts.iter().any(|(p, _)| *p == x.prompt) {
                prompts.push((x.prompt.clone(), x.reference.clone()));
            }
        }
    }
    for (pi, (prompt, reference)) in prompts.iter().enumerate().take(MAX_PROMPTS) {
        blocks.push(Block::Heading(4, format!("Prompt {}", pi + 1)));
        blocks.push(Block::Quote(prompt.clone()));
        if let Some(r) = reference {
            blocks.push(Block::Para(format!("Reference: {r}")));
        }
        blocks.push(Block::Table(prompt_table(exp, all, prompt)));
    }
    if prompts.len() > MAX_PROMPTS {
        blocks.push(Block::Para(format!(
            "{} more prompt(s) not shown; see the generations files.",
            prompts.len() - MAX_PROMPTS
        )));
    }
    blocks
}

/// A missing answer gets a row saying so, rather than a silently shorter table.
fn prompt_table(exp: &Experiment, all: &[Answers], prompt: &str) -> Table {
    let mut t = Table {
        header: vec![
            "model".into(),
            "answer".into(),
            "seconds".into(),
            "tokens".into(),
            "correct".into(),
        ],
        wide: vec![1],
        class: "answers",
        ..Default::default()
    };
    if exp.base_generations.is_none() {
        t.rows.push(vec![
            "base".into(),
            "(missing: no base_generations.jsonl)".into(),
            String::new(),
            String::new(),
            String::new(),
        ]);
    }
    for (label, g) in all {
        match g.iter().find(|x| x.prompt == prompt) {
            Some(x) => t.rows.push(vec![
                label.clone(),
                x.output.clone(),
                opt(x.seconds),
                opt(x.tokens),
                match x.correct {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => "–".into(),
                },
            ]),
            None => t.rows.push(vec![
                label.clone(),
                "(no answer to this prompt)".into(),
                String::new(),
                String::new(),
                String::new(),
            ]),
        }
    }
    t
}
