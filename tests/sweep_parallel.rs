//! Sweeps across runs: `--jobs`/`devices` inside one process, several `tuna sweep` processes on
//! one experiment (one of them killed with SIGKILL mid-run), run identity, early stopping.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::reference_dir;
use tuna::config::{self, load_experiment};
use tuna::sweep::executor::{RunContext, SweepOptions, Trainer, run_sweep_with};
use tuna::sweep::{Leaderboard, RunMetrics};

/// A trainer that takes a while and records who trained what, where, and how many at once.
#[derive(Default)]
struct Slow {
    active: AtomicUsize,
    max_active: AtomicUsize,
    /// run id → devices it was trained on.
    trained: Mutex<HashMap<String, Vec<Option<String>>>>,
    /// Devices in use right now.
    busy: Mutex<Vec<String>>,
}

impl Trainer for Slow {
    fn train(&self, ctx: &RunContext) -> anyhow::Result<RunMetrics> {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_active.fetch_max(now, Ordering::SeqCst);
        let dev = ctx.device.map(str::to_string);
        if let Some(d) = &dev {
            let mut busy = self.busy.lock().unwrap();
            assert!(!busy.contains(d), "two runs on {d} at once");
            busy.push(d.clone());
        }
        self.trained
            .lock()
            .unwrap()
            .entry(ctx.plan.id.clone())
            .or_default()
            .push(dev.clone());
        std::thread::sleep(Duration::from_millis(150));
        if let Some(d) = &dev {
            self.busy.lock().unwrap().retain(|b| b != d);
        }
        self.active.fetch_sub(1, Ordering::SeqCst);
        Ok(RunMetrics {
            final_train_loss: Some(1.0),
            ..Default::default()
        })
    }
}

fn fake_experiment(dir: &Path) -> PathBuf {
    let p = dir.join("exp.yaml");
    std::fs::write(
        &p,
        "name: t\nmodel: m\ndata: d\noutput:\n  dir: results\ngrid:\n  lora.rank: [1, 2, 4]\n  train.learning_rate: [1e-4, 1e-3]\n",
    )
    .unwrap();
    p
}

#[test]
fn jobs_train_runs_side_by_side_one_per_device() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = load_experiment(&fake_experiment(tmp.path()), &[]).unwrap();
    let runs = config::expand(&exp).unwrap();
    assert_eq!(runs.len(), 6);
    let t = Slow::default();
    let opts = SweepOptions {
        jobs: 3,
        devices: vec!["vulkan:0".into(), "vulkan:1".into(), "vulkan:2".into()],
        ..Default::default()
    };
    let started = Instant::now();
    let o = run_sweep_with(&exp, &runs, &t, &AtomicBool::new(false), &opts, |_| {}).unwrap();
    let wall = started.elapsed();
    assert_eq!(o.done.len(), 6);
    assert_eq!(t.max_active.load(Ordering::SeqCst), 3, "three at once");
    assert!(
        wall < Duration::from_millis(6 * 150),
        "ran in parallel: {wall:?}"
    );
    let trained = t.trained.lock().unwrap();
    assert_eq!(trained.len(), 6);
    for (id, devs) in trained.iter() {
        assert_eq!(devs.len(), 1, "{id} trained {} times", devs.len());
        assert!(devs[0].as_deref().unwrap().starts_with("vulkan:"));
    }
    let table = Leaderboard::new(&tmp.path().join("results/leaderboard.csv"))
        .read()
        .unwrap();
    assert_eq!(table.rows.len(), 6);
    assert!(table.rows.iter().all(|r| r["status"] == "done"));

    // A second sweep with two jobs finds everything done.
    let t2 = Slow::default();
    let opts = SweepOptions {
        jobs: 2,
        ..Default::default()
    };
    let o = run_sweep_with(&exp, &runs, &t2, &AtomicBool::new(false), &opts, |_| {}).unwrap();
    assert_eq!((o.done.len(), o.skipped.len()), (0, 6));
    assert!(t2.trained.lock().unwrap().is_empty());
}

#[test]
fn a_run_locked_by_another_holder_is_waited_for_not_trained() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = load_experiment(&fake_experiment(tmp.path()), &[]).unwrap();
    let runs = config::expand(&exp).unwrap();
    // Stand in for another process: hold run 0's lock, then mark it done and let go.
    let dir = tmp.path().join("results/t").join(&runs[0].id);
    std::fs::create_dir_all(&dir).unwrap();
    let lock = std::fs::File::create(dir.join(".lock")).unwrap();
    lock.lock().unwrap();
    let holder = std::thread::spawn({
        let dir = dir.clone();
        move || {
            std::thread::sleep(Duration::from_millis(600));
            tuna::sweep::RunDir { path: dir }
                .set_status(tuna::sweep::State::Done, None)
                .unwrap();
            drop(lock);
        }
    });
    let t = Slow::default();
    let opts = SweepOptions {
        jobs: 1,
        poll: Duration::from_millis(50),
        ..Default::default()
    };
    let lines = Mutex::new(Vec::new());
    let o = run_sweep_with(&exp, &runs, &t, &AtomicBool::new(false), &opts, |l| {
        lines.lock().unwrap().push(l.to_string())
    })
    .unwrap();
    holder.join().unwrap();
    assert_eq!(o.done.len(), 5);
    assert_eq!(o.elsewhere, vec![runs[0].id.clone()]);
    assert!(!t.trained.lock().unwrap().contains_key(&runs[0].id));
    let lines = lines.into_inner().unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("being trained by another process")),
        "{lines:?}"
    );
}

// ---- several real processes ----

/// The shared tiny experiment with `ranks` (a YAML list) × two learning rates, `iters` steps.
fn tiny_experiment_of(dir: &Path, ranks: &str, iters: u64) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = format!(
        "name: shared\nmodel: {}\ndata: {}\ndevice: cpu\n\
         train:\n  iters: {iters}\n  batch_size: 2\n  learning_rate: 5e-3\n  max_seq_length: 96\n  \
         steps_per_report: 20\n  steps_per_eval: 30\n  val_batches: 2\n  save_every: 5\n\
         lora:\n  num_layers: -1\n  rank: 4\noutput:\n  dir: {}\n\
         grid:\n  lora.rank: {ranks}\n  train.learning_rate: [1e-3, 5e-3]\n",
        reference_dir().join("tiny-llama").display(),
        root.join("experiments/data/diagnosis").display(),
        dir.join("out").display(),
    );
    let p = dir.join("exp.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

/// A `tuna sweep` process whose stderr lines are collected as they come.
struct Sweeper {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Sweeper {
    fn start(spec: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tuna"))
            .args(["sweep", spec.to_str().unwrap()])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().unwrap();
        let reader = std::thread::spawn({
            let lines = lines.clone();
            move || {
                for l in BufReader::new(err).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(l);
                }
            }
        });
        Sweeper {
            child,
            lines,
            reader: Some(reader),
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn finish(mut self) -> (bool, Vec<String>) {
        let ok = self.child.wait().unwrap().success();
        self.reader.take().unwrap().join().unwrap();
        (ok, self.lines())
    }
}

/// The run ids a process's log says it started training.
fn started(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.ends_with(": training"))
        .map(|l| {
            l.split("run ")
                .nth(1)
                .unwrap()
                .split(':')
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn three_processes_share_a_sweep_and_survive_a_kill_9() {
    processes_share_a_sweep_and_survive_a_kill_9(3, "[2, 4, 8]", 60);
}

#[test]
fn two_processes_share_a_sweep_and_survive_a_kill_9() {
    processes_share_a_sweep_and_survive_a_kill_9(2, "[2]", 30);
}

/// `n` sweep processes on one experiment of `ranks` × 2 runs of `iters` steps; the first is
/// killed with SIGKILL once its run has a checkpoint. Every run ends done, started once (the
/// killed one twice, resumed by another process), with one log per run.
fn processes_share_a_sweep_and_survive_a_kill_9(n: usize, ranks: &str, iters: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let spec = tiny_experiment_of(tmp.path(), ranks, iters);
    let runs = 2 * ranks.split(',').count();
    let mut procs: Vec<Sweeper> = (0..n).map(|_| Sweeper::start(&spec)).collect();

    // Kill the first process once the run it trains has a checkpoint.
    let exp_dir = tmp.path().join("out/shared");
    let t0 = Instant::now();
    let victim_run = loop {
        let mine = started(&procs[0].lines());
        if let Some(id) = mine.last()
            && exp_dir.join(id).join("checkpoint/state.json").exists()
        {
            break id.clone();
        }
        assert!(
            procs[0].child.try_wait().unwrap().is_none(),
            "process 0 ended early"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint from process 0"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    procs[0].child.kill().unwrap(); // SIGKILL: its lock goes with it
    let victim = procs.remove(0);
    let (_, victim_lines) = victim.finish();

    let mut all_started: Vec<String> = started(&victim_lines);
    let mut resumed = false;
    for p in procs {
        let (ok, lines) = p.finish();
        assert!(ok, "{}", lines.join("\n"));
        resumed |= lines
            .iter()
            .any(|l| l.contains(&format!("resuming run {victim_run}")));
        all_started.extend(started(&lines));
    }
    // Every run was started once, except the killed one, taken over and resumed once.
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for id in &all_started {
        *counts.entry(id.clone()).or_default() += 1;
    }
    assert_eq!(counts.len(), runs, "{counts:?}");
    for (id, n) in &counts {
        let want = if *id == victim_run { 2 } else { 1 };
        assert_eq!(*n, want, "run {id} started {n} times: {counts:?}");
    }
    assert!(resumed, "the killed run resumed from its checkpoint");

    // Nobody wrote a run's log twice: training steps rise strictly in every run.
    for id in counts.keys() {
        let log = std::fs::read_to_string(exp_dir.join(id).join("metrics.jsonl")).unwrap();
        let steps: Vec<u64> = log
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["kind"] == "train")
            .map(|v| v["step"].as_u64().unwrap())
            .collect();
        assert!(steps.windows(2).all(|w| w[0] < w[1]), "{id}: {steps:?}");
        assert_eq!(steps.last(), Some(&iters), "{id}");
    }
    let table = Leaderboard::new(&tmp.path().join("out/leaderboard.csv"))
        .read()
        .unwrap();
    assert_eq!(table.rows.len(), runs);
    assert!(
        table.rows.iter().all(|r| r["status"] == "done"),
        "{:?}",
        table.rows
    );

    // A fourth process has nothing to do.
    let (ok, lines) = Sweeper::start(&spec).finish();
    assert!(ok);
    assert!(started(&lines).is_empty(), "{lines:?}");
}

// ---- run identity ----

/// `tuna plan`'s run ids for an experiment, with its own hash cache.
fn plan_ids(spec: &Path, cache: &Path) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_tuna"))
        .args(["plan", spec.to_str().unwrap()])
        .env("TUNA_CACHE", cache)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(3)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|id| id.len() == 10)
        .collect()
}

#[test]
fn changed_data_or_model_files_make_new_run_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for f in ["train.jsonl", "valid.jsonl"] {
        std::fs::copy(
            root.join("experiments/data/diagnosis").join(f),
            data.join(f),
        )
        .unwrap();
    }
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(reference_dir().join("tiny-llama").join(f), model.join(f)).unwrap();
    }
    let spec = tmp.path().join("exp.yaml");
    std::fs::write(
        &spec,
        "name: id\nmodel: model\ndata: data\ngrid:\n  lora.rank: [2, 4]\n",
    )
    .unwrap();
    let cache = tmp.path().join("cache");
    let first = plan_ids(&spec, &cache);
    assert_eq!(first.len(), 2);
    assert_eq!(
        plan_ids(&spec, &cache),
        first,
        "same inputs, same ids (from the hash cache)"
    );
    let cached = std::fs::read_to_string(cache.join("fingerprints.json")).unwrap();
    assert!(cached.contains("model.safetensors") && cached.contains("train.jsonl"));

    // One more training example: new runs.
    let mut train = std::fs::read_to_string(data.join("train.jsonl")).unwrap();
    let first_line = train.lines().next().unwrap().to_string();
    train.push_str(&first_line);
    train.push('\n');
    std::fs::write(data.join("train.jsonl"), &train).unwrap();
    let edited = plan_ids(&spec, &cache);
    assert!(
        edited.iter().all(|id| !first.contains(id)),
        "{first:?} vs {edited:?}"
    );

    // Another model under the same path: new runs again.
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    cfg["rms_norm_eps"] = serde_json::json!(1e-6);
    std::fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    let other_model = plan_ids(&spec, &cache);
    assert!(other_model.iter().all(|id| !edited.contains(id)));
}

// ---- early stopping ----

/// Reports a fixed validation loss per run (by its rank) at every rung and at the end, as the
/// real trainer logs it, and stops when the pruner says so.
struct Rungs {
    steps: Mutex<BTreeMap<i64, u64>>,
}

impl Trainer for Rungs {
    fn train(&self, ctx: &RunContext) -> anyhow::Result<RunMetrics> {
        const LOSS: [f64; 9] = [5.0, 3.0, 8.0, 1.0, 9.0, 2.0, 7.0, 4.0, 6.0];
        let rank = ctx.plan.config["lora"]["rank"].as_i64().unwrap();
        // Rank 6 starts well and then falls behind: it passes the first rung, not the second.
        let loss_at = |step: u64| {
            if rank == 6 && step >= 30 {
                9.0
            } else {
                LOSS[rank as usize - 1]
            }
        };
        let p = ctx.pruner.expect("early_stop is set");
        let mut log = String::new();
        let mut stopped = None;
        for step in p.eval_steps().into_iter().chain([p.iters]) {
            let loss = loss_at(step);
            log.push_str(&format!(
                "{{\"kind\":\"val\",\"step\":{step},\"val_loss\":{loss}}}\n"
            ));
            std::fs::write(ctx.dir.path.join("metrics.jsonl"), &log)?;
            if step < p.iters
                && let Some(why) = p.check(step, loss, loss, Some(10.0))
            {
                stopped = Some((step, why));
                break;
            }
        }
        self.steps
            .lock()
            .unwrap()
            .insert(rank, stopped.as_ref().map_or(p.iters, |s| s.0));
        Ok(RunMetrics {
            best_val_loss: Some(loss_at(0)),
            stopped_step: stopped.as_ref().map(|s| s.0),
            stop_reason: stopped.map(|s| s.1),
            ..Default::default()
        })
    }
}

#[test]
fn asha_stops_the_runs_outside_the_best_third_at_each_rung() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("exp.yaml");
    std::fs::write(
        &p,
        "name: asha\nmodel: m\ndata: d\noutput:\n  dir: results\ntrain:\n  iters: 100\n\
         early_stop:\n  method: asha\n  min_steps: 10\n  reduction_factor: 3\n\
         grid:\n  lora.rank: [1, 2, 3, 4, 5, 6, 7, 8, 9]\n",
    )
    .unwrap();
    let exp = load_experiment(&p, &[]).unwrap();
    let runs = config::expand(&exp).unwrap();
    let t = Rungs {
        steps: Mutex::new(BTreeMap::new()),
    };
    let o = run_sweep_with(
        &exp,
        &runs,
        &t,
        &AtomicBool::new(false),
        &SweepOptions::default(),
        |_| {},
    )
    .unwrap();
    assert_eq!(o.done.len(), 9);
    // Rungs at 10, 30, 90. With losses 5 3 8 1 9 2 7 4 6 in grid order, a run goes on while its
    // loss is at most the 1/3 quantile of the losses recorded at the rung so far: 8 (3 runs:
    // cutoff 4.33), 9, 7, 4 and 6 stop at step 10; rank 6 passes step 10 with 2 (cutoff 2.67)
    // but has 9 at step 30, where 5, 3 and 1 were recorded (cutoff 3), and stops there; ranks 1,
    // 2 and 4 (5, 3, 1) pass every rung they reach.
    let steps = t.steps.lock().unwrap().clone();
    let want: BTreeMap<i64, u64> = [
        (1, 100),
        (2, 100),
        (3, 10),
        (4, 100),
        (5, 10),
        (6, 30),
        (7, 10),
        (8, 10),
        (9, 10),
    ]
    .into_iter()
    .collect();
    assert_eq!(steps, want);
    let spent: u64 = steps.values().sum();
    assert_eq!(spent, 3 * 100 + 30 + 5 * 10);
    let table = Leaderboard::new(&tmp.path().join("results/leaderboard.csv"))
        .read()
        .unwrap();
    let pruned: Vec<&str> = table
        .rows
        .iter()
        .filter(|r| r["status"] == "pruned")
        .map(|r| r["lora.rank"].as_str())
        .collect();
    assert_eq!(pruned.len(), 6);
    for r in table.rows.iter().filter(|r| r["status"] == "pruned") {
        let want = if r["lora.rank"] == "6" { "30" } else { "10" };
        assert_eq!(r["stopped_step"], want, "rank {}", r["lora.rank"]);
    }
    // Pruned runs are final: a second sweep trains nothing.
    let t2 = Rungs {
        steps: Mutex::new(BTreeMap::new()),
    };
    let o = run_sweep_with(
        &exp,
        &runs,
        &t2,
        &AtomicBool::new(false),
        &SweepOptions::default(),
        |_| {},
    )
    .unwrap();
    assert_eq!(o.skipped.len(), 9);
}
