//! Runs a planned grid: skips runs whose folder says done, re-runs failed and unfinished ones,
//! keeps going past a failure, stops cleanly on Ctrl-C, and keeps the leaderboard current.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Result;
use serde_json::Value as J;

use super::leaderboard::{Leaderboard, Row};
use super::run_dir::{RunDir, RunMetrics, State};
use crate::config::{Experiment, RunPlan};

/// What a trainer gets for one run.
pub struct RunContext<'a> {
    pub experiment: &'a str,
    pub plan: &'a RunPlan,
    pub dir: &'a RunDir,
    /// Set by Ctrl-C: the trainer should checkpoint and return [`Interrupted`] soon.
    pub cancel: &'a AtomicBool,
}

/// The error a trainer returns when it stopped because `cancel` was set.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted")
    }
}
impl std::error::Error for Interrupted {}

/// Trains one run. The real implementation lives in `train/`; tests use doubles.
pub trait Trainer {
    fn train(&self, ctx: &RunContext) -> Result<RunMetrics>;
}

/// What happened to each run of a sweep.
#[derive(Debug, Default)]
pub struct SweepOutcome {
    pub done: Vec<String>,
    pub skipped: Vec<String>,
    pub failed: Vec<(String, String)>,
    pub interrupted: bool,
}

/// The output folder of an experiment's resolved config.
pub fn output_dir(base: &J) -> PathBuf {
    // A config without `output.dir` reads the catalog's default.
    PathBuf::from(
        crate::config::keys::Resolved(base)
            .str("output.dir")
            .unwrap_or_else(|_| "results".into()),
    )
}

/// The leaderboard every experiment under `output_dir` shares.
pub fn leaderboard_of(output_dir: &Path) -> Leaderboard {
    Leaderboard::new(&output_dir.join("leaderboard.csv"))
}

/// A run's leaderboard row.
pub fn row(exp: &Experiment, plan: &RunPlan, state: State, metrics: RunMetrics) -> Row {
    Row {
        run_id: plan.id.clone(),
        experiment: exp.name.clone(),
        status: state,
        varied: exp
            .vary
            .keys()
            .into_iter()
            .map(|k| {
                let v = crate::config::keys::get_path(&plan.config, &k)
                    .cloned()
                    .unwrap_or(J::Null);
                (k, cell(&v))
            })
            .collect(),
        seed: plan.seed,
        metrics,
    }
}

/// A config value as a CSV cell: strings bare, everything else as compact JSON.
pub fn cell(v: &J) -> String {
    match v {
        J::String(s) => s.clone(),
        J::Null => String::new(),
        other => other.to_string(),
    }
}

/// What the process should do to each run in progress if it must exit at once (a second
/// Ctrl-C): mark it `interrupted` in its folder and the leaderboard, so it does not read
/// `running`. Keyed by run folder, so runs training side by side each have their own.
type AbortHooks = Vec<(PathBuf, Box<dyn Fn() + Send>)>;
static ON_ABORT: Mutex<AbortHooks> = Mutex::new(Vec::new());

/// Marks every run in progress in this process as interrupted. Called from the signal handler
/// before the process exits without waiting for the trainers.
pub fn abort_current_run() {
    if let Ok(hooks) = ON_ABORT.lock() {
        for (_, f) in hooks.iter() {
            f();
        }
    }
}

fn set_on_abort(run: &Path, f: Option<Box<dyn Fn() + Send>>) {
    if let Ok(mut hooks) = ON_ABORT.lock() {
        hooks.retain(|(p, _)| p != run);
        if let Some(f) = f {
            hooks.push((run.to_path_buf(), f));
        }
    }
}

/// How one run ended.
enum RunEnd {
    Done,
    Interrupted,
    Failed(String),
}

/// Runs every planned run that is not already done. A run whose training fails, or whose
/// bookkeeping (status, metrics, leaderboard) cannot be written, fails alone: the sweep goes
/// on with the next run.
pub fn run_sweep(
    exp: &Experiment,
    runs: &[RunPlan],
    trainer: &dyn Trainer,
    cancel: &AtomicBool,
    mut log: impl FnMut(&str),
) -> Result<SweepOutcome> {
    let out_dir = output_dir(&exp.base);
    let board = leaderboard_of(&out_dir);
    let mut outcome = SweepOutcome::default();
    for (i, plan) in runs.iter().enumerate() {
        let dir = RunDir::new(&out_dir, &exp.name, &plan.id);
        let prefix = format!("[{}/{}] run {}", i + 1, runs.len(), plan.id);
        if dir.status().is_some_and(|s| s.state == State::Done) {
            log(&format!("{prefix}: done already, skipped"));
            if let Err(e) = board.upsert(&row(
                exp,
                plan,
                State::Done,
                dir.metrics().unwrap_or_default(),
            )) {
                log(&format!("{prefix}: cannot update the leaderboard: {e:#}"));
            }
            outcome.skipped.push(plan.id.clone());
            continue;
        }
        if cancel.load(Ordering::SeqCst) {
            outcome.interrupted = true;
            break;
        }
        log(&format!("{prefix}: training"));
        let started = Instant::now();
        {
            let (dir, board) = (dir.clone(), board.clone());
            let aborted = row(exp, plan, State::Interrupted, RunMetrics::default());
            set_on_abort(
                &dir.path.clone(),
                Some(Box::new(move || {
                    let _ = dir.set_status(
                        State::Interrupted,
                        Some("stopped by a second Ctrl-C; `tuna sweep` resumes it".into()),
                    );
                    let _ = board.upsert(&aborted);
                })),
            );
        }
        let end = run_one(exp, plan, &dir, &board, trainer, cancel);
        set_on_abort(&dir.path, None);
        match end {
            RunEnd::Done => {
                log(&format!(
                    "{prefix}: done in {:.1} s",
                    started.elapsed().as_secs_f64()
                ));
                outcome.done.push(plan.id.clone());
            }
            RunEnd::Interrupted => {
                log(&format!(
                    "{prefix}: interrupted; run `tuna sweep` again to resume"
                ));
                outcome.interrupted = true;
                break;
            }
            RunEnd::Failed(msg) => {
                log(&format!("{prefix}: FAILED: {msg}"));
                outcome.failed.push((plan.id.clone(), msg));
            }
        }
    }
    Ok(outcome)
}

/// Trains one run and records how it ended in its folder and the leaderboard.
fn run_one(
    exp: &Experiment,
    plan: &RunPlan,
    dir: &RunDir,
    board: &Leaderboard,
    trainer: &dyn Trainer,
    cancel: &AtomicBool,
) -> RunEnd {
    let started = Instant::now();
    let prepared = (|| -> Result<()> {
        dir.create()?;
        dir.write_config(plan)?;
        dir.set_status(State::Running, None)?;
        board.upsert(&row(exp, plan, State::Running, RunMetrics::default()))
    })();
    let result = prepared.and_then(|()| {
        let ctx = RunContext {
            experiment: &exp.name,
            plan,
            dir,
            cancel,
        };
        std::panic::catch_unwind(AssertUnwindSafe(|| trainer.train(&ctx)))
            .unwrap_or_else(|p| Err(anyhow::anyhow!("the trainer panicked: {}", panic_text(&p))))
    });
    let end = match result {
        Ok(mut metrics) => {
            metrics
                .wall_s
                .get_or_insert(started.elapsed().as_secs_f64());
            // Trained: a second Ctrl-C from here on must not mark the run interrupted.
            set_on_abort(&dir.path, None);
            let recorded = (|| -> Result<()> {
                dir.write_metrics(&metrics)?;
                dir.set_status(State::Done, None)?;
                board.upsert(&row(exp, plan, State::Done, metrics.clone()))
            })();
            match recorded {
                Ok(()) => return RunEnd::Done,
                Err(e) => RunEnd::Failed(format!("trained, but cannot record it: {e:#}")),
            }
        }
        Err(e) if e.is::<Interrupted>() || cancel.load(Ordering::SeqCst) => {
            let _ = dir.set_status(
                State::Interrupted,
                Some("stopped by Ctrl-C; `tuna sweep` resumes it".into()),
            );
            let _ = board.upsert(&row(
                exp,
                plan,
                State::Interrupted,
                dir.metrics().unwrap_or_default(),
            ));
            return RunEnd::Interrupted;
        }
        Err(e) => RunEnd::Failed(format!("{e:#}")),
    };
    if let RunEnd::Failed(msg) = &end {
        // Best effort: the disk may be what failed.
        let _ = dir.set_status(State::Failed, Some(msg.clone()));
        let _ = board.upsert(&row(exp, plan, State::Failed, RunMetrics::default()));
    }
    end
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// The state of a planned run, read from its folder (`pending` when it has none).
pub fn state_of(exp: &Experiment, plan: &RunPlan) -> State {
    RunDir::new(&output_dir(&exp.base), &exp.name, &plan.id)
        .status()
        .map(|s| s.state)
        .unwrap_or(State::Pending)
}

/// `tuna plan`'s table: id, the varied values, seed, status.
pub fn plan_table(exp: &Experiment, runs: &[RunPlan]) -> String {
    let keys = exp.vary.keys();
    let mut header: Vec<String> = vec!["run".into()];
    header.extend(keys.iter().cloned());
    header.push("seed".into());
    header.push("status".into());
    let mut rows: Vec<Vec<String>> = Vec::new();
    for plan in runs {
        let mut r = vec![plan.id.clone()];
        for k in &keys {
            r.push(cell(
                crate::config::keys::get_path(&plan.config, k).unwrap_or(&J::Null),
            ));
        }
        r.push(plan.seed.to_string());
        r.push(state_of(exp, plan).as_str().to_string());
        rows.push(r);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .chain([header[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let fmt_row = |r: &[String]| {
        r.iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = format!("{}: {} run(s)\n", exp.name, runs.len());
    out.push_str(&fmt_row(&header));
    out.push('\n');
    out.push_str(
        &widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("  "),
    );
    out.push('\n');
    for r in &rows {
        out.push_str(&fmt_row(r));
        out.push('\n');
    }
    out
}
