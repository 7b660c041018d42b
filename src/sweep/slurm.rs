//! `tuna sweep --executor slurm`: one Slurm job array with a task per pending run. Each task
//! runs `tuna sweep EXPERIMENT --run ID` (the same settings), which claims the run's lock,
//! resumes its checkpoint if it has one, and writes its folder and leaderboard row as a local
//! sweep does. A run is marked `queued` with its task (`slurm job 12_3`) when submitted; a
//! second submit skips runs that are done, pruned, or still queued or running in Slurm, and
//! submits the rest again, so cancelled tasks resume.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value as J;

use super::executor::{leaderboard_of, output_dir, row};
use super::run_dir::{RunDir, RunMetrics, State};
use crate::config::keys::Resolved;
use crate::config::{Experiment, RunPlan};

/// What `sbatch` is asked for, from the experiment's `slurm:` section and the command line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlurmOptions {
    pub partition: Option<String>,
    pub time: Option<String>,
    pub gpus_per_task: u64,
    /// Further `sbatch` arguments, as given (`--account=x`, `--mem=16G`).
    pub sbatch_args: Vec<String>,
}

impl SlurmOptions {
    /// The `slurm.*` keys of an experiment; command-line values replace them where given.
    pub fn from_experiment(
        base: &J,
        partition: Option<String>,
        time: Option<String>,
        gpus_per_task: Option<u64>,
        extra: Vec<String>,
    ) -> Result<Self> {
        let r = Resolved(base);
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        let mut sbatch_args = r.strings("slurm.sbatch_args")?;
        sbatch_args.extend(extra);
        Ok(Self {
            partition: partition.or_else(|| r.str("slurm.partition").ok().and_then(non_empty)),
            time: time.or_else(|| r.str("slurm.time").ok().and_then(non_empty)),
            gpus_per_task: gpus_per_task.unwrap_or(r.u64("slurm.gpus_per_task")?),
            sbatch_args,
        })
    }
}

/// The Slurm task a status note names (`slurm job 12_3` → `12_3`).
pub fn task_of(note: &str) -> Option<&str> {
    note.strip_prefix("slurm job ")
}

/// The state Slurm reports for each task of the given jobs (`12_3` → `PENDING`), array tasks
/// listed one by one. Jobs Slurm no longer knows are simply absent.
pub fn task_states(jobs: &[String]) -> Result<std::collections::HashMap<String, String>> {
    let mut out = std::collections::HashMap::new();
    if jobs.is_empty() {
        return Ok(out);
    }
    let o = Command::new("squeue")
        .args(["-h", "-r", "-o", "%i %T", "-j", &jobs.join(",")])
        .output()
        .context("cannot run squeue (is Slurm installed and SLURM_CONF set?)")?;
    // squeue fails for job ids it has forgotten; that means none of them is queued.
    if o.status.success() {
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            if let Some((id, state)) = line.trim().split_once(' ') {
                out.insert(id.to_string(), state.to_string());
            }
        }
    }
    Ok(out)
}

/// Runs that a Slurm task still holds: their folders say `queued` by a task Slurm still lists,
/// or `running` by a process that holds the run's lock.
fn held_in_slurm(dirs: &[RunDir]) -> Result<Vec<bool>> {
    let notes: Vec<Option<String>> = dirs
        .iter()
        .map(|d| {
            d.status()
                .filter(|s| s.state == State::Queued)
                .and_then(|s| s.error)
                .and_then(|n| task_of(&n).map(str::to_string))
        })
        .collect();
    let jobs: Vec<String> = {
        let mut j: Vec<String> = notes
            .iter()
            .flatten()
            .filter_map(|t| t.split('_').next().map(str::to_string))
            .collect();
        j.sort();
        j.dedup();
        j
    };
    let live = task_states(&jobs)?;
    Ok(dirs
        .iter()
        .zip(&notes)
        .map(|(d, note)| {
            note.as_ref().is_some_and(|t| live.contains_key(t))
                || (d.status().is_some_and(|s| s.state == State::Running)
                    && super::executor::is_claimed(d))
        })
        .collect())
}

/// What a submission did.
#[derive(Debug, Default)]
pub struct Submitted {
    pub job: Option<String>,
    /// Run ids given a task, in task order.
    pub runs: Vec<String>,
    /// Runs already done or pruned.
    pub finished: Vec<String>,
    /// Runs a live Slurm task still holds.
    pub in_slurm: Vec<String>,
    pub script: Option<PathBuf>,
}

/// Submits one job array for every run that is neither finished nor held by a live task.
/// `experiment` and `sets` are what the tasks pass to `tuna sweep`.
pub fn submit(
    exp: &Experiment,
    runs: &[RunPlan],
    experiment: &Path,
    sets: &[String],
    opts: &SlurmOptions,
) -> Result<Submitted> {
    let out_dir = output_dir(&exp.base);
    let board = leaderboard_of(&out_dir);
    let dirs: Vec<RunDir> = runs
        .iter()
        .map(|p| RunDir::new(&out_dir, &exp.name, &p.id))
        .collect();
    let held = held_in_slurm(&dirs)?;
    let mut s = Submitted::default();
    let mut todo = Vec::new();
    for ((plan, dir), held) in runs.iter().zip(&dirs).zip(held) {
        if dir.status().is_some_and(|st| st.state.is_final()) {
            s.finished.push(plan.id.clone());
        } else if held {
            s.in_slurm.push(plan.id.clone());
        } else {
            todo.push((plan, dir));
        }
    }
    if todo.is_empty() {
        return Ok(s);
    }
    for (plan, dir) in &todo {
        dir.create()?;
        dir.write_config(plan)?;
    }
    let exp_dir = out_dir.join(&exp.name);
    let slurm_dir = exp_dir.join("slurm");
    std::fs::create_dir_all(&slurm_dir)
        .with_context(|| format!("cannot create {}", slurm_dir.display()))?;
    let ids: Vec<&str> = todo.iter().map(|(p, _)| p.id.as_str()).collect();
    let script = slurm_dir.join(format!("submit-{}.sh", super::run_dir::now()));
    let text = batch_script(exp, experiment, sets, opts, &ids, &slurm_dir)?;
    crate::files::write_atomic(&script, text.as_bytes())?;
    let o = Command::new("sbatch")
        .arg("--parsable")
        .arg(&script)
        .output()
        .context("cannot run sbatch (is Slurm installed and SLURM_CONF set?)")?;
    if !o.status.success() {
        bail!(
            "sbatch {} failed: {}",
            script.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let job = String::from_utf8_lossy(&o.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap_or_default()
        .to_string();
    for (i, (plan, dir)) in todo.iter().enumerate() {
        // Not over a run a task already started (and marked running).
        if dir.status().is_none_or(|st| {
            !matches!(st.state, State::Running) || !super::executor::is_claimed(dir)
        }) {
            dir.set_status(State::Queued, Some(format!("slurm job {job}_{i}")))?;
            board.upsert(&row(
                exp,
                plan,
                State::Queued,
                dir.metrics().unwrap_or_else(RunMetrics::default),
            ))?;
        }
        s.runs.push(plan.id.clone());
    }
    s.job = Some(job);
    s.script = Some(script);
    Ok(s)
}

/// A shell word, quoted for bash.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The `sbatch` script: `#SBATCH` lines, then task `i` trains run `RUNS[i]`.
fn batch_script(
    exp: &Experiment,
    experiment: &Path,
    sets: &[String],
    opts: &SlurmOptions,
    ids: &[&str],
    slurm_dir: &Path,
) -> Result<String> {
    let tuna = std::env::current_exe().context("cannot locate the tuna executable")?;
    let cwd = std::env::current_dir()?;
    let abs = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            cwd.join(p)
        }
    };
    let mut t = String::from("#!/bin/bash\n");
    t.push_str(&format!(
        "#SBATCH --job-name={}\n",
        quote(&format!("tuna-{}", exp.name))
    ));
    t.push_str(&format!("#SBATCH --array=0-{}\n", ids.len() - 1));
    t.push_str(&format!(
        "#SBATCH --output={}\n",
        quote(&abs(slurm_dir).join("%A_%a.log").to_string_lossy())
    ));
    if let Some(p) = &opts.partition {
        t.push_str(&format!("#SBATCH --partition={}\n", quote(p)));
    }
    if let Some(x) = &opts.time {
        t.push_str(&format!("#SBATCH --time={}\n", quote(x)));
    }
    if opts.gpus_per_task > 0 {
        t.push_str(&format!("#SBATCH --gpus-per-task={}\n", opts.gpus_per_task));
    }
    for a in &opts.sbatch_args {
        t.push_str(&format!("#SBATCH {}\n", quote(a)));
    }
    t.push_str("# Written by `tuna sweep --executor slurm`: task i trains run RUNS[i].\n");
    t.push_str(&format!("RUNS=({})\n", ids.join(" ")));
    t.push_str(&format!("cd {}\n", quote(&cwd.to_string_lossy())));
    let mut cmd = vec![
        quote(&tuna.to_string_lossy()),
        "sweep".into(),
        quote(&abs(experiment).to_string_lossy()),
        "--run".into(),
        "\"${RUNS[$SLURM_ARRAY_TASK_ID]}\"".into(),
    ];
    for s in sets {
        cmd.push("--set".into());
        cmd.push(quote(s));
    }
    t.push_str(&format!("exec {}\n", cmd.join(" ")));
    Ok(t)
}

/// `tuna plan`'s status of a run: its folder's, with what Slurm says of a queued task.
pub fn plan_status(dir: &RunDir) -> Option<String> {
    let st = dir.status()?;
    if st.state != State::Queued {
        return None;
    }
    let task = st.error.as_deref().and_then(task_of)?.to_string();
    let job = task.split('_').next().unwrap_or_default().to_string();
    let states = task_states(&[job]).ok()?;
    Some(match states.get(&task) {
        Some(s) => format!("queued (slurm {task} {})", s.to_lowercase()),
        None => format!("queued (slurm {task} gone: submit again)"),
    })
}
