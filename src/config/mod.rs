//! Experiment specs: files (YAML/TOML) → validated layers → recipe chains → grids of runs.

pub mod doc;
pub mod error;
pub mod grid;
pub mod keys;
pub mod layer;
pub mod paths;
pub mod recipe;
pub mod spec;
pub mod vary;

pub use error::ConfigError;
pub use grid::{Fingerprints, RunPlan, expand, run_id};
pub use spec::{Experiment, load_experiment};
