//! Sweeps: run folders, the executor that walks a grid, and the shared leaderboard.

pub mod early_stop;
pub mod executor;
pub mod identity;
pub mod leaderboard;
pub mod metrics_log;
pub mod run_dir;
pub mod slurm;

pub use executor::{RunContext, SweepOutcome, Trainer, run_sweep};
pub use leaderboard::Leaderboard;
pub use run_dir::{RunDir, RunMetrics, State};
