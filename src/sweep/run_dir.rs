//! One run's folder, `<output.dir>/<experiment>/<run-id>/`: `config.yaml` (the resolved
//! config, itself valid input to `tuna train`), `status.json`, `metrics.json` (the summary),
//! and whatever the trainer writes (`metrics.jsonl`, adapters, checkpoints).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value as J;

use crate::config::RunPlan;
use crate::config::keys::{self, CATALOG, Kind};
use crate::config::paths::{normalize, relative_to};
use crate::files::write_atomic;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Running,
    Done,
    Failed,
    /// Stopped by Ctrl-C; resumes on the next sweep.
    Interrupted,
    /// Stopped by the sweep's `early_stop` rules; final, like `done`.
    Pruned,
    /// Submitted to Slurm, waiting for its task (the status note names it).
    Queued,
}

impl State {
    /// Finished for good: a sweep does not train it again.
    pub fn is_final(self) -> bool {
        matches!(self, State::Done | State::Pruned)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Running => "running",
            State::Done => "done",
            State::Failed => "failed",
            State::Interrupted => "interrupted",
            State::Pruned => "pruned",
            State::Queued => "queued",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Seconds since the Unix epoch.
    pub updated: u64,
}

/// The summary a trainer returns; every field becomes a leaderboard column.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunMetrics {
    pub final_train_loss: Option<f64>,
    /// Best validation loss after step 0 (the untrained model's is `base_val_loss`).
    pub best_val_loss: Option<f64>,
    /// The step of `best_val_loss`; the adapter of that step is `adapter-best/`.
    #[serde(default)]
    pub best_val_step: Option<u64>,
    /// Validation loss of the base model, before training (step 0).
    #[serde(default)]
    pub base_val_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub test_loss: Option<f64>,
    pub test_ppl: Option<f64>,
    pub tokens_per_s: Option<f64>,
    /// Peak host RSS of the process.
    pub peak_mem_mb: Option<f64>,
    /// Device memory the GPU allocator held at the end of training (None on the CPU).
    #[serde(default)]
    pub gpu_mem_mb: Option<f64>,
    pub wall_s: Option<f64>,
    /// The step `early_stop` stopped the run at, and why.
    #[serde(default)]
    pub stopped_step: Option<u64>,
    #[serde(default)]
    pub stop_reason: Option<String>,
    pub backend: Option<String>,
    pub device: Option<String>,
    /// `eval.metric` and the fraction of test answers it scored correct.
    #[serde(default)]
    pub task_metric: Option<String>,
    #[serde(default)]
    pub task_score: Option<f64>,
}

impl RunMetrics {
    /// (column, value) pairs in leaderboard order; `None` for a metric not measured.
    pub fn columns(&self) -> Vec<(&'static str, Option<String>)> {
        let f = |v: Option<f64>| {
            v.map(|x| {
                format!("{x:.6}")
                    .trim_end_matches('0')
                    .trim_end_matches('.')
                    .to_string()
            })
        };
        vec![
            ("final_train_loss", f(self.final_train_loss)),
            ("best_val_loss", f(self.best_val_loss)),
            ("best_val_step", self.best_val_step.map(|s| s.to_string())),
            ("base_val_loss", f(self.base_val_loss)),
            ("final_val_loss", f(self.final_val_loss)),
            ("test_loss", f(self.test_loss)),
            ("test_ppl", f(self.test_ppl)),
            ("tokens_per_s", f(self.tokens_per_s)),
            ("peak_mem_mb", f(self.peak_mem_mb)),
            ("gpu_mem_mb", f(self.gpu_mem_mb)),
            ("wall_s", f(self.wall_s)),
            ("stopped_step", self.stopped_step.map(|s| s.to_string())),
            ("task_metric", self.task_metric.clone()),
            ("task_score", f(self.task_score)),
            ("backend", self.backend.clone()),
            ("device", self.device.clone()),
        ]
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    /// The folder of `plan` in experiment `experiment` under `output_dir`.
    pub fn new(output_dir: &Path, experiment: &str, id: &str) -> RunDir {
        RunDir {
            path: output_dir.join(experiment).join(id),
        }
    }

    pub fn create(&self) -> Result<()> {
        std::fs::create_dir_all(&self.path)
            .with_context(|| format!("cannot create run folder {}", self.path.display()))
    }

    pub fn status(&self) -> Option<Status> {
        let text = std::fs::read_to_string(self.path.join("status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn set_status(&self, state: State, error: Option<String>) -> Result<()> {
        let s = Status {
            state,
            error,
            updated: now(),
        };
        write_atomic(
            &self.path.join("status.json"),
            serde_json::to_string_pretty(&s)?.as_bytes(),
        )
    }

    pub fn metrics(&self) -> Option<RunMetrics> {
        let text = std::fs::read_to_string(self.path.join("metrics.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn write_metrics(&self, m: &RunMetrics) -> Result<()> {
        write_atomic(
            &self.path.join("metrics.json"),
            serde_json::to_string_pretty(m)?.as_bytes(),
        )
    }

    /// Writes `config.yaml` with its paths rewritten relative to the run folder, so that
    /// `tuna train <run>/config.yaml` resolves them exactly as the sweep did.
    pub fn write_config(&self, plan: &RunPlan) -> Result<()> {
        let config = rebase_paths(&plan.config, Path::new("."), &self.path);
        let yaml = serde_saphyr::to_string(&config).context("cannot write config.yaml")?;
        let inputs = match &plan.fingerprints {
            Some(f) => format!(
                "# Its id also covers the inputs: data fingerprint {}, model fingerprint {}.\n",
                f.data, f.model
            ),
            None => String::new(),
        };
        let text = format!(
            "# Resolved config of run {} (tuna writes this file; it is valid input to `tuna train`).\n{inputs}{yaml}",
            plan.id
        );
        write_atomic(&self.path.join("config.yaml"), text.as_bytes())
    }
}

/// Rewrites every path-valued key from relative-to-`from` to relative-to-`to`.
pub fn rebase_paths(config: &J, from: &Path, to: &Path) -> J {
    let mut out = config.clone();
    for info in CATALOG
        .iter()
        .filter(|k| matches!(k.kind, Kind::Path | Kind::Model))
    {
        if let Some(J::String(s)) = keys::get_path(config, info.key) {
            if s.starts_with("hf:") || s.starts_with("pypi:") || Path::new(s).is_absolute() {
                continue;
            }
            let target = normalize(&from.join(s));
            let rel = relative_to(&target, to);
            keys::set_path(
                &mut out,
                info.key,
                J::String(rel.to_string_lossy().replace('\\', "/")),
            );
        }
    }
    out
}
