//! The second Ctrl-C's hook, in a test binary of its own: it marks every run in progress in
//! the process, so it must not share a process with other sweeps.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use tuna::config::{self, load_experiment};
use tuna::sweep::executor::{Interrupted, RunContext, Trainer, run_sweep};
use tuna::sweep::{Leaderboard, RunMetrics, State};

fn experiment(dir: &Path) -> PathBuf {
    let p = dir.join("exp.yaml");
    std::fs::write(&p, "name: t\nmodel: m\ndata: d\noutput:\n  dir: results\n").unwrap();
    p
}

#[test]
fn an_abort_mid_run_marks_the_run_interrupted() {
    // What the second Ctrl-C does before exiting: the run in progress must not read `running`.
    struct AbortMidRun;
    impl Trainer for AbortMidRun {
        fn train(&self, ctx: &RunContext) -> anyhow::Result<RunMetrics> {
            assert_eq!(ctx.dir.status().unwrap().state, State::Running);
            tuna::sweep::executor::abort_current_run();
            assert_eq!(ctx.dir.status().unwrap().state, State::Interrupted);
            Err(Interrupted.into())
        }
    }
    let d = tempfile::tempdir().unwrap();
    let p = experiment(d.path());
    let exp = load_experiment(&p, &[]).unwrap();
    let runs = config::expand(&exp).unwrap();
    let o = run_sweep(&exp, &runs, &AbortMidRun, &AtomicBool::new(false), |_| {}).unwrap();
    assert!(o.interrupted);
    let table = Leaderboard::new(&d.path().join("results/leaderboard.csv"))
        .read()
        .unwrap();
    assert_eq!(table.rows[0]["status"], "interrupted");
    // Outside a run there is nothing to mark.
    tuna::sweep::executor::abort_current_run();
}
