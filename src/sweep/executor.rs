//! Runs a planned grid: skips runs whose folder says done, re-runs failed and unfinished ones,
//! keeps going past a failure, stops cleanly on Ctrl-C, and keeps the leaderboard current.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
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
    /// The device this worker trains on (`vulkan:1`), in place of the config's `device`.
    pub device: Option<&'a str>,
    /// The sweep's `early_stop` rules for this run, if any.
    pub pruner: Option<&'a super::early_stop::Pruner>,
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
pub trait Trainer: Sync {
    fn train(&self, ctx: &RunContext) -> Result<RunMetrics>;
}

/// What happened to each run of a sweep.
#[derive(Debug, Default)]
pub struct SweepOutcome {
    pub done: Vec<String>,
    pub skipped: Vec<String>,
    pub failed: Vec<(String, String)>,
    /// Runs another `tuna sweep` process trained (or failed) while this one ran.
    pub elsewhere: Vec<String>,
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
        fingerprints: plan.fingerprints.clone(),
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

/// How a sweep process spreads its runs.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// Runs trained at once by this process (each on its own thread).
    pub jobs: usize,
    /// The device of each worker (`vulkan:0`, `vulkan:1`, …): worker `i` trains every run it
    /// takes on `devices[i % len]`. Empty: each run trains where its config says.
    pub devices: Vec<String>,
    /// How often a process whose remaining runs are all held by other processes looks again.
    pub poll: std::time::Duration,
}

impl Default for SweepOptions {
    fn default() -> Self {
        Self {
            jobs: 1,
            devices: Vec::new(),
            poll: std::time::Duration::from_secs(2),
        }
    }
}

/// Runs every planned run that is not already done, one at a time (see [`run_sweep_with`]).
pub fn run_sweep(
    exp: &Experiment,
    runs: &[RunPlan],
    trainer: &dyn Trainer,
    cancel: &AtomicBool,
    log: impl Fn(&str) + Sync,
) -> Result<SweepOutcome> {
    run_sweep_with(exp, runs, trainer, cancel, &SweepOptions::default(), log)
}

/// Which runs this process has dealt with, shared by its workers.
#[derive(Default)]
struct Claims {
    /// Runs this process trained, skipped or saw finished: never taken again.
    settled: std::collections::HashSet<usize>,
    /// Runs found locked by another process at some point.
    seen_held: std::collections::HashSet<usize>,
    outcome: SweepOutcome,
    /// A run stopped with [`Interrupted`]: take no more.
    stop: bool,
}

/// What a worker gets when it asks for work.
enum Next {
    Train(usize, std::fs::File),
    /// Every remaining run is held by another process: look again later.
    Wait,
    Finished,
}

/// Runs every planned run that is not already done, on `opts.jobs` workers. Each run is claimed
/// with an exclusive lock on `<run>/.lock` for as long as it trains, so any number of `tuna
/// sweep` processes (on one machine, or sharing the results folder over a network filesystem)
/// can work on one experiment: none trains a run another holds, and the lock of a process that
/// died is released by the kernel, so its run is taken over and resumed from its checkpoint. A
/// run another process finished (or failed) is not trained again. A run whose training fails, or
/// whose bookkeeping cannot be written, fails alone: the sweep goes on with the next run.
pub fn run_sweep_with(
    exp: &Experiment,
    runs: &[RunPlan],
    trainer: &dyn Trainer,
    cancel: &AtomicBool,
    opts: &SweepOptions,
    log: impl Fn(&str) + Sync,
) -> Result<SweepOutcome> {
    let out_dir = output_dir(&exp.base);
    let board = leaderboard_of(&out_dir);
    let claims = Mutex::new(Claims::default());
    let jobs = opts.jobs.max(1).min(runs.len().max(1));
    let worker = |w: usize| {
        let device =
            (!opts.devices.is_empty()).then(|| opts.devices[w % opts.devices.len()].clone());
        loop {
            match next_run(exp, runs, &out_dir, &board, &claims, cancel, &log) {
                Next::Finished => return,
                Next::Wait => std::thread::sleep(opts.poll),
                Next::Train(i, lock) => {
                    let plan = &runs[i];
                    let dir = RunDir::new(&out_dir, &exp.name, &plan.id);
                    let on = device
                        .as_deref()
                        .map(|d| format!(" on {d}"))
                        .unwrap_or_default();
                    let prefix = format!("[{}/{}] run {}", i + 1, runs.len(), plan.id);
                    log(&format!("{prefix}: training{on}"));
                    let end =
                        train_claimed(exp, plan, &dir, &board, trainer, cancel, device.as_deref());
                    drop(lock);
                    let mut c = claims.lock().unwrap_or_else(|p| p.into_inner());
                    match end.0 {
                        RunEnd::Done => {
                            log(&format!("{prefix}: done in {:.1} s", end.1));
                            c.outcome.done.push(plan.id.clone());
                        }
                        RunEnd::Interrupted => {
                            log(&format!(
                                "{prefix}: interrupted; run `tuna sweep` again to resume"
                            ));
                            c.outcome.interrupted = true;
                            c.stop = true;
                        }
                        RunEnd::Failed(msg) => {
                            log(&format!("{prefix}: FAILED: {msg}"));
                            c.outcome.failed.push((plan.id.clone(), msg));
                        }
                    }
                }
            }
        }
    };
    if jobs == 1 {
        worker(0);
    } else {
        std::thread::scope(|s| {
            for w in 0..jobs {
                let worker = &worker;
                s.spawn(move || worker(w));
            }
        });
    }
    let mut c = claims.into_inner().unwrap_or_else(|p| p.into_inner());
    if cancel.load(Ordering::SeqCst) && c.settled.len() < runs.len() {
        c.outcome.interrupted = true;
    }
    Ok(c.outcome)
}

/// The next run this process may train, claimed; or whether to wait for other processes.
fn next_run(
    exp: &Experiment,
    runs: &[RunPlan],
    out_dir: &Path,
    board: &Leaderboard,
    claims: &Mutex<Claims>,
    cancel: &AtomicBool,
    log: &(impl Fn(&str) + Sync),
) -> Next {
    let mut c = claims.lock().unwrap_or_else(|p| p.into_inner());
    let mut held = false;
    for (i, plan) in runs.iter().enumerate() {
        if c.settled.contains(&i) {
            continue;
        }
        if c.stop || cancel.load(Ordering::SeqCst) {
            return Next::Finished;
        }
        let dir = RunDir::new(out_dir, &exp.name, &plan.id);
        let prefix = format!("[{}/{}] run {}", i + 1, runs.len(), plan.id);
        let state = dir.status().map(|s| s.state);
        if let Some(st) = state.filter(|s| s.is_final()) {
            c.settled.insert(i);
            if c.seen_held.contains(&i) {
                log(&format!("{prefix}: done by another process"));
                c.outcome.elsewhere.push(plan.id.clone());
            } else {
                log(&format!("{prefix}: {} already, skipped", st.as_str()));
                if let Err(e) = board.upsert(&row(exp, plan, st, dir.metrics().unwrap_or_default()))
                {
                    log(&format!("{prefix}: cannot update the leaderboard: {e:#}"));
                }
                c.outcome.skipped.push(plan.id.clone());
            }
            continue;
        }
        let lock = match dir.create().and_then(|()| try_claim(&dir)) {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                if c.seen_held.insert(i) {
                    log(&format!("{prefix}: being trained by another process"));
                }
                held = true;
                continue;
            }
            Err(e) => {
                c.settled.insert(i);
                let msg = format!("{e:#}");
                log(&format!("{prefix}: FAILED: {msg}"));
                c.outcome.failed.push((plan.id.clone(), msg));
                continue;
            }
        };
        // Claimed: read the status again, another process may have finished it meanwhile.
        let state = dir.status().map(|s| s.state);
        if c.seen_held.contains(&i) && state == Some(State::Failed) {
            // It failed in the process that held it: that process reports it.
            c.settled.insert(i);
            c.outcome.elsewhere.push(plan.id.clone());
            continue;
        }
        if state.is_some_and(|s| s.is_final()) {
            c.settled.insert(i);
            c.outcome.elsewhere.push(plan.id.clone());
            continue;
        }
        c.settled.insert(i);
        return Next::Train(i, lock);
    }
    if held { Next::Wait } else { Next::Finished }
}

/// Whether some process (or worker) holds the run's lock right now.
pub fn is_claimed(dir: &RunDir) -> bool {
    dir.path.join(".lock").exists() && matches!(try_claim(dir), Ok(None))
}

/// Takes `<run>/.lock` without waiting; `None` when another process (or worker) holds it.
fn try_claim(dir: &RunDir) -> Result<Option<std::fs::File>> {
    let path = dir.path.join(".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open the run's lock file {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Trains a claimed run with the second-Ctrl-C hook in place; returns how it ended and the
/// seconds it took.
fn train_claimed(
    exp: &Experiment,
    plan: &RunPlan,
    dir: &RunDir,
    board: &Leaderboard,
    trainer: &dyn Trainer,
    cancel: &AtomicBool,
    device: Option<&str>,
) -> (RunEnd, f64) {
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
    let end = run_one(exp, plan, dir, board, trainer, cancel, device);
    set_on_abort(&dir.path, None);
    (end, started.elapsed().as_secs_f64())
}

/// Trains one run and records how it ended in its folder and the leaderboard.
fn run_one(
    exp: &Experiment,
    plan: &RunPlan,
    dir: &RunDir,
    board: &Leaderboard,
    trainer: &dyn Trainer,
    cancel: &AtomicBool,
    device: Option<&str>,
) -> RunEnd {
    let started = Instant::now();
    let prepared = (|| -> Result<()> {
        dir.create()?;
        dir.write_config(plan)?;
        dir.set_status(State::Running, None)?;
        board.upsert(&row(exp, plan, State::Running, RunMetrics::default()))
    })();
    let pruner = super::early_stop::EarlyStop::from_config(&plan.config)
        .ok()
        .flatten()
        .map(|rules| super::early_stop::Pruner {
            rules,
            experiment_dir: dir.path.parent().map(Path::to_path_buf).unwrap_or_default(),
            run_id: plan.id.clone(),
            iters: crate::config::keys::Resolved(&plan.config)
                .u64("train.iters")
                .unwrap_or(0),
        });
    let result = prepared.and_then(|()| {
        let ctx = RunContext {
            pruner: pruner.as_ref(),
            experiment: &exp.name,
            plan,
            dir,
            cancel,
            device,
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
            let (state, note) = match metrics.stopped_step {
                Some(_) => (State::Pruned, metrics.stop_reason.clone()),
                None => (State::Done, None),
            };
            let recorded = (|| -> Result<()> {
                dir.write_metrics(&metrics)?;
                dir.set_status(state, note)?;
                board.upsert(&row(exp, plan, state, metrics.clone()))
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
        let dir = RunDir::new(&output_dir(&exp.base), &exp.name, &plan.id);
        r.push(
            super::slurm::plan_status(&dir)
                .unwrap_or_else(|| state_of(exp, plan).as_str().to_string()),
        );
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
