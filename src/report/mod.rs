//! Comparison reports (see issue 5): `tuna report results/<experiment>` reads what sweeps left
//! on disk and writes `report.md` (charts as SVG files in `report_charts/`) and a
//! self-contained `report.html` (inline CSS and SVG): the leaderboard grouped by setting with
//! seeds aggregated, the effect of each varied key, an A/B comparison with Welch's t-test,
//! loss curves, base-vs-tuned answers, and what is missing.

pub mod build;
pub mod chart;
pub mod doc;
pub mod load;
pub mod stats;

use std::path::PathBuf;

use anyhow::{Context, Result};

pub use build::{Built, build};
pub use load::{Results, load};

/// What `tuna report` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// Experiment folders (`results/<experiment>`), output folders, or leaderboard CSV files.
    pub inputs: Vec<PathBuf>,
    /// Where to write; default: the experiment folder (one input), else the first input's
    /// parent (a CSV's own folder).
    pub out: Option<PathBuf>,
    /// The ranking metric (default `best_val_loss`).
    pub metric: String,
    /// `KEY=A,B` or `RUNID,RUNID`.
    pub compare: Option<String>,
}

/// What `tuna report` wrote.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub markdown: PathBuf,
    pub html: PathBuf,
    /// Short text for the terminal.
    pub summary: String,
    pub winner: Option<String>,
}

/// Reads the inputs, builds the report and writes report.md, report_charts/*.svg and
/// report.html.
pub fn run(opts: &Options) -> Result<Outcome> {
    let res = load(&opts.inputs)?;
    let built = build(&res, &opts.metric, opts.compare.as_deref())?;
    let out = opts.out.clone().unwrap_or_else(|| res.default_out.clone());
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let charts = out.join(doc::CHART_DIR);
    let mut any_chart = false;
    for b in &built.blocks {
        if let doc::Block::Chart { name, svg, .. } = b {
            if !any_chart {
                std::fs::create_dir_all(&charts)
                    .with_context(|| format!("cannot create {}", charts.display()))?;
                any_chart = true;
            }
            let p = charts.join(format!("{name}.svg"));
            std::fs::write(&p, svg).with_context(|| format!("cannot write {}", p.display()))?;
        }
    }
    let markdown = out.join("report.md");
    let html = out.join("report.html");
    std::fs::write(&markdown, doc::markdown(&built.title, &built.blocks))
        .with_context(|| format!("cannot write {}", markdown.display()))?;
    std::fs::write(&html, doc::html(&built.title, &built.blocks))
        .with_context(|| format!("cannot write {}", html.display()))?;
    let summary = format!(
        "{}wrote {} and {}\n",
        built.summary,
        markdown.display(),
        html.display()
    );
    Ok(Outcome {
        markdown,
        html,
        summary,
        winner: built.winner,
    })
}
