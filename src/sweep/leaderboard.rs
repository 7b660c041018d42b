//! `leaderboard.csv`: one row per run, upserted under an exclusive lock and replaced
//! atomically, so that two sweeps writing at once or a crash mid-write never leave a broken
//! row. Columns are the union over every experiment that wrote to it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::run_dir::{RunMetrics, State};
use crate::files::{lock_exclusive, write_atomic};

/// Columns before the varied keys.
pub const HEAD: &[&str] = &["run_id", "experiment", "status"];
/// Columns after the varied keys (the metric columns come from [`RunMetrics::columns`]).
pub fn tail() -> Vec<&'static str> {
    std::iter::once("seed")
        .chain(RunMetrics::default().columns().into_iter().map(|(c, _)| c))
        .chain(["data_fingerprint", "model_fingerprint"])
        .collect()
}

/// One leaderboard row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub run_id: String,
    pub experiment: String,
    pub status: State,
    pub varied: Vec<(String, String)>,
    pub seed: i64,
    pub metrics: RunMetrics,
    /// The run's input fingerprints (data, model), when known.
    pub fingerprints: Option<crate::config::Fingerprints>,
}

impl Row {
    fn cells(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("run_id".into(), self.run_id.clone());
        m.insert("experiment".into(), self.experiment.clone());
        m.insert("status".into(), self.status.as_str().into());
        for (k, v) in &self.varied {
            m.insert(k.clone(), v.clone());
        }
        m.insert("seed".into(), self.seed.to_string());
        for (k, v) in self.metrics.columns() {
            m.insert(k.into(), v.unwrap_or_default());
        }
        if let Some(f) = &self.fingerprints {
            m.insert("data_fingerprint".into(), f.data.clone());
            m.insert("model_fingerprint".into(), f.model.clone());
        }
        m
    }
}

#[derive(Debug, Clone)]
pub struct Leaderboard {
    pub path: PathBuf,
}

/// The whole table as read back: header and rows as column → cell.
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<BTreeMap<String, String>>,
}

impl Leaderboard {
    pub fn new(path: &Path) -> Self {
        Leaderboard {
            path: path.to_path_buf(),
        }
    }

    /// Inserts or replaces the row of (experiment, run_id).
    pub fn upsert(&self, row: &Row) -> Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let lock_path = self.path.with_extension("csv.lock");
        let _lock = lock_exclusive(&lock_path)?;
        self.upsert_locked(row)
    }

    fn upsert_locked(&self, row: &Row) -> Result<()> {
        let mut table = self.read()?;
        let cells = row.cells();
        let varied: Vec<String> = row.varied.iter().map(|(k, _)| k.clone()).collect();
        table.header = merge_header(&table.header, &varied);
        let pos = table.rows.iter().position(|r| {
            r.get("run_id") == cells.get("run_id") && r.get("experiment") == cells.get("experiment")
        });
        match pos {
            Some(i) => table.rows[i] = cells,
            None => table.rows.push(cells),
        }
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(&table.header)?;
        for r in &table.rows {
            w.write_record(
                table
                    .header
                    .iter()
                    .map(|h| r.get(h).map(String::as_str).unwrap_or("")),
            )?;
        }
        let bytes = w.into_inner().context("cannot encode the leaderboard")?;
        write_atomic(&self.path, &bytes)
    }

    /// Reads the table; a missing file is an empty table.
    pub fn read(&self) -> Result<Table> {
        if !self.path.exists() {
            return Ok(Table::default());
        }
        let mut r = csv::Reader::from_path(&self.path)
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        let header: Vec<String> = r.headers()?.iter().map(String::from).collect();
        let mut rows = Vec::new();
        for (i, rec) in r.records().enumerate() {
            let rec = rec
                .with_context(|| format!("{}: row {} is malformed", self.path.display(), i + 2))?;
            rows.push(
                header
                    .iter()
                    .cloned()
                    .zip(rec.iter().map(String::from))
                    .collect(),
            );
        }
        Ok(Table { header, rows })
    }
}

/// The union of an existing header and new varied columns, keeping the fixed columns in place.
pub fn merge_header(existing: &[String], varied: &[String]) -> Vec<String> {
    let fixed: Vec<String> = HEAD
        .iter()
        .chain(tail().iter())
        .map(|s| s.to_string())
        .collect();
    let mut middle: Vec<String> = existing
        .iter()
        .filter(|h| !fixed.contains(h))
        .cloned()
        .collect();
    for v in varied {
        if !middle.contains(v) {
            middle.push(v.clone());
        }
    }
    HEAD.iter()
        .map(|s| s.to_string())
        .chain(middle)
        .chain(tail().iter().map(|s| s.to_string()))
        .collect()
}
