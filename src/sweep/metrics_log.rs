//! The per-run metrics log, `metrics.jsonl`: one JSON object per report, evaluation and
//! final test, each with its `step` and `kind` (`train`, `val`, `test`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Value, json};

pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    /// Opens the log of a run; when resuming from `resume_step`, entries after it are dropped
    /// so the log reads as if the run had never stopped.
    pub fn open(dir: &Path, resume_step: Option<u64>) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        match resume_step {
            None => {
                std::fs::write(&path, "")
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            Some(step) => {
                let kept: Vec<String> = read(&path)
                    .into_iter()
                    .filter(|v| {
                        v["step"].as_u64().is_some_and(|s| s <= step) && v["kind"] != "test"
                    })
                    .map(|v| v.to_string())
                    .collect();
                let text = if kept.is_empty() {
                    String::new()
                } else {
                    kept.join("\n") + "\n"
                };
                std::fs::write(&path, text)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
        }
        Ok(MetricsLog { path })
    }

    /// Appends one entry (`kind` and `step` are added).
    pub fn log(&self, kind: &str, step: u64, mut fields: Value) -> Result<()> {
        fields["kind"] = json!(kind);
        fields["step"] = json!(step);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)
            .with_context(|| format!("cannot append to {}", self.path.display()))?;
        writeln!(f, "{fields}").with_context(|| format!("cannot append to {}", self.path.display()))
    }

    pub fn entries(&self) -> Vec<Value> {
        read(&self.path)
    }
}

/// Reads a metrics log, skipping a torn last line (a crash mid-write).
pub fn read(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
