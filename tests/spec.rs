//! Experiment specs, recipes, grids, run ids, the executor's resume logic and the leaderboard.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use serde_json::json;
use tuna::config::keys::get_path;
use tuna::config::{self, ConfigError, load_experiment};
use tuna::sweep::executor::{Interrupted, RunContext, Trainer, run_sweep};
use tuna::sweep::{Leaderboard, RunMetrics, State};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    p
}

/// An experiment file in a fresh folder whose output goes to that folder's `results/`.
fn experiment(body: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("name: t\nmodel: m\ndata: d\noutput:\n  dir: results\n{body}");
    let p = write(dir.path(), "exp.yaml", &text);
    (dir, p)
}

fn plan(body: &str) -> Vec<config::RunPlan> {
    let (_d, p) = experiment(body);
    config::expand(&load_experiment(&p, &[]).unwrap()).unwrap()
}

fn err(body: &str) -> ConfigError {
    let (_d, p) = experiment(body);
    match load_experiment(&p, &[]).and_then(|e| config::expand(&e)) {
        Ok(runs) => panic!("expected an error, got {} runs", runs.len()),
        Err(e) => e,
    }
}

fn val<'a>(run: &'a config::RunPlan, key: &str) -> &'a serde_json::Value {
    get_path(&run.config, key).unwrap()
}

#[test]
fn product_in_file_order() {
    let runs = plan("grid:\n  lora.rank: [4, 8]\n  train.learning_rate: [1e-5, 2e-5, 3e-5]\n");
    assert_eq!(runs.len(), 6);
    let pairs: Vec<(i64, f64)> = runs
        .iter()
        .map(|r| {
            (
                val(r, "lora.rank").as_i64().unwrap(),
                val(r, "train.learning_rate").as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        vec![
            (4, 1e-5),
            (4, 2e-5),
            (4, 3e-5),
            (8, 1e-5),
            (8, 2e-5),
            (8, 3e-5)
        ]
    );
    let mut ids: Vec<_> = runs.iter().map(|r| r.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6, "every point has its own id");
}

#[test]
fn scalars_count_as_one_element_lists() {
    let runs = plan("grid:\n  lora.rank: 4\n  lora.dropout: [0.0, 0.1]\n");
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|r| val(r, "lora.rank") == &json!(4)));
}

#[test]
fn zip_moves_keys_together() {
    let runs = plan(
        "grid:\n  lora.rank: [4, 8]\nzip:\n  - {train.iters: 10, train.lr_schedule: \"5:1e-5,5:1e-6\"}\n  - {train.iters: 20, train.lr_schedule: cosine}\n",
    );
    assert_eq!(runs.len(), 4);
    for r in &runs {
        let iters = val(r, "train.iters").as_i64().unwrap();
        let s = val(r, "train.lr_schedule").as_str().unwrap();
        assert!(
            (iters == 10 && s == "5:1e-5,5:1e-6") || (iters == 20 && s == "cosine"),
            "{iters} {s}"
        );
    }
}

#[test]
fn nested_zip_makes_several_axes() {
    let runs = plan(
        "zip:\n  - [{lora.rank: 4, lora.scale: 8}, {lora.rank: 8, lora.scale: 16}]\n  - [{train.iters: 5}, {train.iters: 6}, {train.iters: 7}]\n",
    );
    assert_eq!(runs.len(), 6);
    assert!(
        runs.iter().all(|r| val(r, "lora.scale").as_f64().unwrap()
            == 2.0 * val(r, "lora.rank").as_f64().unwrap())
    );
}

#[test]
fn exclude_drops_matching_points() {
    let runs = plan(
        "grid:\n  lora.rank: [4, 8]\n  lora.dropout: [0.0, 0.1]\nexclude:\n  - {lora.rank: 8, lora.dropout: 0.1}\n",
    );
    assert_eq!(runs.len(), 3);
    assert!(
        !runs
            .iter()
            .any(|r| val(r, "lora.rank") == &json!(8) && val(r, "lora.dropout") == &json!(0.1))
    );
}

#[test]
fn seeds_repeat_each_point() {
    let runs = plan("grid:\n  lora.rank: [4, 8]\nseeds: [0, 1, 2]\n");
    assert_eq!(runs.len(), 6);
    let seeds: Vec<i64> = runs.iter().map(|r| r.seed).collect();
    assert_eq!(seeds, vec![0, 1, 2, 0, 1, 2]);
    assert!(runs.iter().all(|r| val(r, "train.seed") == &json!(r.seed)));
    assert_eq!(plan("seeds: 7\n")[0].seed, 7);
}

#[test]
fn recipes_inherit_through_yaml_and_toml_with_precedence() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "recipes/root.toml",
        "model = \"hf:root/model\"\n[train]\niters = 11\nbatch_size = 2\n[lora]\nrank = 2\nscale = 4\n",
    );
    write(
        dir.path(),
        "recipes/mid.yaml",
        "recipe: root.toml\ntrain:\n  iters: 22\nlora:\n  rank: 3\n",
    );
    let exp = write(
        dir.path(),
        "exp/e.yaml",
        "name: e\nrecipe: ../recipes/mid.yaml\ndata: d\nlora:\n  rank: 5\n",
    );
    let e = load_experiment(&exp, &[]).unwrap();
    assert_eq!(
        get_path(&e.base, "model"),
        Some(&json!("hf:root/model")),
        "from the root recipe"
    );
    assert_eq!(
        get_path(&e.base, "train.batch_size"),
        Some(&json!(2)),
        "root recipe"
    );
    assert_eq!(
        get_path(&e.base, "train.iters"),
        Some(&json!(22)),
        "middle recipe overrides root"
    );
    assert_eq!(
        get_path(&e.base, "lora.rank"),
        Some(&json!(5)),
        "experiment overrides recipes"
    );
    assert_eq!(
        get_path(&e.base, "lora.scale"),
        Some(&json!(4.0)),
        "TOML int normalized to float"
    );
    assert_eq!(
        get_path(&e.base, "train.learning_rate"),
        Some(&json!(1e-5)),
        "built-in default"
    );
    // --set beats everything.
    let e = load_experiment(
        &exp,
        &["lora.rank=9".into(), "lora.keys=[q_proj, k_proj]".into()],
    )
    .unwrap();
    assert_eq!(get_path(&e.base, "lora.rank"), Some(&json!(9)));
    assert_eq!(
        get_path(&e.base, "lora.keys"),
        Some(&json!(["q_proj", "k_proj"]))
    );
}

#[test]
fn paths_resolve_relative_to_the_file_that_names_them() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "recipes/r.yaml", "data: ../datasets/x\n");
    let exp = write(
        dir.path(),
        "exp/e.yaml",
        "name: e\nmodel: hf:org/name\nrecipe: ../recipes/r.yaml\n",
    );
    let e = load_experiment(&exp, &[]).unwrap();
    let data = e.base["data"].as_str().unwrap();
    let resolved = std::env::current_dir().unwrap().join(data);
    assert_eq!(
        config::paths::normalize(&resolved),
        dir.path().join("datasets/x")
    );
    assert_eq!(
        e.base["model"],
        json!("hf:org/name"),
        "hub references are not paths"
    );
}

#[test]
fn run_ids_ignore_key_order_and_number_formatting() {
    // One folder for all three, so that the relative `data` path resolves alike.
    let dir = tempfile::tempdir().unwrap();
    let plan = |name: &str, body: &str| {
        let p = write(
            dir.path(),
            name,
            &format!("name: {name}\nmodel: hf:a/b\ndata: d\n{body}"),
        );
        config::expand(&load_experiment(&p, &[]).unwrap()).unwrap()
    };
    let a = plan(
        "a.yaml",
        "train:\n  learning_rate: 1e-5\n  iters: 100\nlora:\n  scale: 20\n",
    );
    let b = plan(
        "b.yaml",
        "lora:\n  scale: 20.0\ntrain:\n  iters: 100\n  learning_rate: 0.00001\n",
    );
    assert_eq!(a[0].id, b[0].id);
    let c = plan(
        "c.yaml",
        "train:\n  learning_rate: 2e-5\n  iters: 100\nlora:\n  scale: 20\n",
    );
    assert_ne!(a[0].id, c[0].id);
    assert_eq!(a[0].id.len(), 10);
    // The run's config.yaml is itself a valid experiment with the same id.
    let (d, p) = experiment("train:\n  iters: 3\n");
    let e = load_experiment(&p, &[]).unwrap();
    let runs = config::expand(&e).unwrap();
    let dir = tuna::sweep::RunDir::new(&d.path().join("results"), "t", &runs[0].id);
    dir.create().unwrap();
    dir.write_config(&runs[0]).unwrap();
    let again =
        config::expand(&load_experiment(&dir.path.join("config.yaml"), &[]).unwrap()).unwrap();
    assert_eq!(
        again[0].config,
        runs[0].config,
        "{}",
        std::fs::read_to_string(dir.path.join("config.yaml")).unwrap()
    );
    assert_eq!(again[0].id, runs[0].id);
    assert_eq!(again[0].config, runs[0].config);
}

#[test]
fn schedule_is_evaluated_from_the_resolved_config() {
    let runs = plan("train:\n  iters: 1000\n  lr_schedule: \"400:2e-5,400:1e-5,200:2e-6\"\n");
    let s = config::grid::lr_schedule(&runs[0].config).unwrap();
    assert_eq!([s.lr_at(0), s.lr_at(400), s.lr_at(999)], [2e-5, 1e-5, 2e-6]);
}

#[test]
fn example_experiments_plan() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let e = load_experiment(&root.join("experiments/grid-example.yaml"), &[]).unwrap();
    let runs = config::expand(&e).unwrap();
    assert_eq!(
        runs.len(),
        20,
        "3 ranks × 2 dropouts × 2 zipped schedules − 2 excluded, × 2 seeds"
    );
    let e = load_experiment(&root.join("experiments/progressive-lr.yaml"), &[]).unwrap();
    let runs = config::expand(&e).unwrap();
    assert_eq!(runs.len(), 1);
    let s = config::grid::lr_schedule(&runs[0].config).unwrap();
    assert_eq!(
        [s.lr_at(399), s.lr_at(400), s.lr_at(800)],
        [2e-5, 1e-5, 2e-6]
    );
    assert_eq!(
        runs[0].config["train"]["mask_prompt"],
        json!(true),
        "from recipes/chat-lora.yaml"
    );
    assert_eq!(
        runs[0].config["train"]["max_seq_length"],
        json!(512),
        "from recipes/base.toml"
    );
}

#[test]
fn plan_command_prints_the_grid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tuna"))
        .args(["plan", "experiments/grid-example.yaml"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("grid-example: 20 run(s)"), "{text}");
    let header = text.lines().nth(1).unwrap();
    for col in [
        "run",
        "lora.rank",
        "lora.dropout",
        "train.iters",
        "train.lr_schedule",
        "seed",
        "status",
    ] {
        assert!(header.contains(col), "{header}");
    }
    assert_eq!(
        text.lines()
            .filter(|l| l.ends_with("pending") || l.ends_with("done"))
            .count(),
        20
    );
}

// ---- bad inputs: every message names the file, the line or key, and what would be right ----

fn assert_names(e: &ConfigError, file_end: &str, line: usize, key: Option<&str>, words: &[&str]) {
    let text = e.to_string();
    assert!(
        e.file.to_string_lossy().ends_with(file_end),
        "file {:?} in `{text}`",
        e.file
    );
    assert_eq!(e.line, line, "line in `{text}`");
    if let Some(k) = key {
        assert_eq!(e.key.as_deref(), Some(k), "key in `{text}`");
    }
    for w in words {
        assert!(text.contains(w), "`{w}` missing from `{text}`");
    }
}

#[test]
fn bad_unknown_key_with_suggestion() {
    let e = err("train:\n  learnig_rate: 1e-5\n");
    assert_names(
        &e,
        "exp.yaml",
        7,
        Some("train.learnig_rate"),
        &["unknown key", "did you mean `train.learning_rate`?"],
    );
}

#[test]
fn bad_top_level_key_that_belongs_in_a_section() {
    let e = err("iters: 5\n");
    assert_names(
        &e,
        "exp.yaml",
        6,
        Some("iters"),
        &["did you mean `train.iters`?"],
    );
}

#[test]
fn bad_type() {
    let e = err("train:\n  iters: many\n");
    assert_names(
        &e,
        "exp.yaml",
        7,
        Some("train.iters"),
        &["expected an integer ≥ 1", "many"],
    );
}

#[test]
fn bad_range() {
    let e = err("lora:\n  rank: 0\n");
    assert_names(&e, "exp.yaml", 7, Some("lora.rank"), &["≥ 1"]);
    let e = err("lora:\n  dropout: 1.5\n");
    assert_names(&e, "exp.yaml", 7, Some("lora.dropout"), &["[0, 1)"]);
}

#[test]
fn bad_choice() {
    let e = err("train:\n  optimizer: sgd\n");
    assert_names(
        &e,
        "exp.yaml",
        7,
        Some("train.optimizer"),
        &["adam | adamw", "sgd"],
    );
}

#[test]
fn bad_lora_module() {
    let e = err("lora:\n  keys: [q_proj, v_prj]\n");
    assert_names(
        &e,
        "exp.yaml",
        7,
        Some("lora.keys"),
        &["v_prj", "did you mean `v_proj`?"],
    );
}

#[test]
fn bad_schedule_string() {
    let e = err("train:\n  lr_schedule: \"400:2e-5,abc\"\n");
    assert_names(
        &e,
        "exp.yaml",
        7,
        Some("train.lr_schedule"),
        &["phase 2", "steps:lr"],
    );
}

#[test]
fn bad_phases_total() {
    let e = err("train:\n  iters: 1000\n  lr_schedule: \"400:2e-5,400:1e-5\"\n");
    assert_names(
        &e,
        "exp.yaml",
        8,
        Some("train.lr_schedule"),
        &["800", "1000", "train.iters: 800"],
    );
}

#[test]
fn bad_phases_total_in_one_grid_point() {
    let e = err("train:\n  lr_schedule: \"5:1e-5,5:1e-6\"\ngrid:\n  train.iters: [10, 12]\n");
    assert_names(
        &e,
        "exp.yaml",
        7,
        Some("train.lr_schedule"),
        &["train.iters=12", "10 steps"],
    );
}

#[test]
fn bad_missing_recipe() {
    let e = err("recipe: nowhere.yaml\n");
    assert_names(
        &e,
        "exp.yaml",
        6,
        Some("recipe"),
        &["nowhere.yaml", "does not exist", "relative to the file"],
    );
}

#[test]
fn bad_recipe_cycle() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", "recipe: b.toml\n");
    write(dir.path(), "b.toml", "recipe = \"a.yaml\"\n");
    let exp = write(
        dir.path(),
        "e.yaml",
        "name: e\nmodel: m\ndata: d\nrecipe: a.yaml\n",
    );
    let e = load_experiment(&exp, &[]).unwrap_err();
    assert_names(
        &e,
        "b.toml",
        1,
        Some("recipe"),
        &["recipe cycle", "a.yaml", "b.toml"],
    );
}

#[test]
fn bad_key_in_toml_recipe() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "r.toml",
        "[train]\niters = 5\n\n[lora]\nranks = 4\n",
    );
    let exp = write(
        dir.path(),
        "e.yaml",
        "name: e\nmodel: m\ndata: d\nrecipe: r.toml\n",
    );
    let e = load_experiment(&exp, &[]).unwrap_err();
    assert_names(
        &e,
        "r.toml",
        5,
        Some("lora.ranks"),
        &["did you mean `lora.rank`?"],
    );
}

#[test]
fn bad_varying_key_in_recipe() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "r.yaml",
        "lora:\n  rank: 4\ngrid:\n  lora.rank: [1, 2]\n",
    );
    let exp = write(
        dir.path(),
        "e.yaml",
        "name: e\nmodel: m\ndata: d\nrecipe: r.yaml\n",
    );
    let e = load_experiment(&exp, &[]).unwrap_err();
    assert_names(&e, "r.yaml", 3, Some("grid"), &["belong in the experiment"]);
}

#[test]
fn bad_grid_key() {
    let e = err("grid:\n  lora.rnak: [4, 8]\n");
    assert_names(
        &e,
        "exp.yaml",
        7,
        Some("grid.lora.rnak"),
        &["unknown key", "did you mean `lora.rank`?"],
    );
}

#[test]
fn bad_grid_value() {
    let e = err("grid:\n  lora.rank: [4, -8]\n");
    assert_names(&e, "exp.yaml", 7, Some("grid.lora.rank"), &["-8", "≥ 1"]);
}

#[test]
fn bad_empty_grid_list() {
    let e = err("grid:\n  lora.rank: []\n");
    assert_names(&e, "exp.yaml", 7, Some("grid.lora.rank"), &["empty list"]);
}

#[test]
fn bad_everything_excluded() {
    let e = err("grid:\n  lora.rank: [4]\nexclude:\n  - {lora.rank: 4}\n");
    assert_names(
        &e,
        "exp.yaml",
        9,
        Some("exclude"),
        &["the grid is empty", "1 points"],
    );
}

#[test]
fn bad_exclude_of_unvaried_key() {
    let e = err("grid:\n  lora.rank: [4, 8]\nexclude:\n  - {lora.dropout: 0.1}\n");
    assert_names(
        &e,
        "exp.yaml",
        9,
        Some("exclude.lora.dropout"),
        &["not varied", "lora.rank"],
    );
}

#[test]
fn bad_zip_with_mismatched_keys() {
    let e = err("zip:\n  - {train.iters: 5, lora.rank: 4}\n  - {train.iters: 6}\n");
    assert_names(
        &e,
        "exp.yaml",
        8,
        Some("zip"),
        &["same keys", "train.iters, lora.rank"],
    );
}

#[test]
fn bad_seed() {
    let e = err("seeds: [0, x]\n");
    assert_names(&e, "exp.yaml", 6, Some("seeds"), &["whole numbers", "x"]);
    let e = err("grid:\n  train.seed: [1, 2]\n");
    assert_names(
        &e,
        "exp.yaml",
        7,
        Some("grid.train.seed"),
        &["cannot be varied", "seeds"],
    );
}

#[test]
fn bad_section_shape() {
    let e = err("train: 5\n");
    assert_names(
        &e,
        "exp.yaml",
        6,
        Some("train"),
        &["expected a mapping", "train.*"],
    );
}

#[test]
fn bad_missing_required_key() {
    let dir = tempfile::tempdir().unwrap();
    let exp = write(dir.path(), "e.yaml", "name: e\ndata: d\n");
    let e = load_experiment(&exp, &[]).unwrap_err();
    assert_names(
        &e,
        "e.yaml",
        0,
        Some("model"),
        &["missing required key `model`", "hf:org/name"],
    );
}

#[test]
fn bad_yaml_syntax() {
    let dir = tempfile::tempdir().unwrap();
    let exp = write(
        dir.path(),
        "e.yaml",
        "name: e\nmodel: m\ntrain:\n  iters: [1, 2\n",
    );
    let e = load_experiment(&exp, &[]).unwrap_err();
    assert!(e.file.ends_with("e.yaml"));
    assert!(e.line >= 4, "{e}");
    assert!(e.to_string().contains("invalid YAML"), "{e}");
}

#[test]
fn bad_missing_experiment_file() {
    let e = load_experiment(Path::new("experiments/nope.yaml"), &[]).unwrap_err();
    assert!(
        e.to_string().contains("experiments/nope.yaml") && e.to_string().contains("cannot read"),
        "{e}"
    );
}

#[test]
fn bad_set_arguments() {
    let (_d, p) = experiment("");
    let e = load_experiment(&p, &["train.learnig_rate=1".into()]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("--set: `train.learnig_rate`: unknown key"),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("did you mean `train.learning_rate`?"),
        "{e}"
    );
    let e = load_experiment(&p, &["lora.rank".into()]).unwrap_err();
    assert!(e.to_string().contains("key.path=value"), "{e}");
    let e = load_experiment(&p, &["lora.rank=big".into()]).unwrap_err();
    assert!(
        e.to_string().contains("`lora.rank`") && e.to_string().contains("big"),
        "{e}"
    );
}

// ---- the executor: skip, resume, failure ----

/// Records calls; fails runs whose rank is listed in `fail`.
struct Double {
    calls: Mutex<Vec<String>>,
    fail: Vec<i64>,
    panic_on: Option<i64>,
}

impl Trainer for Double {
    fn train(&self, ctx: &RunContext) -> anyhow::Result<RunMetrics> {
        self.calls.lock().unwrap().push(ctx.plan.id.clone());
        let rank = ctx.plan.config["lora"]["rank"].as_i64().unwrap();
        if self.panic_on == Some(rank) {
            panic!("boom at rank {rank}");
        }
        if self.fail.contains(&rank) {
            anyhow::bail!("out of memory at rank {rank}");
        }
        assert!(
            ctx.dir.path.join("config.yaml").exists(),
            "config written before training"
        );
        Ok(RunMetrics {
            final_train_loss: Some(1.0 / rank as f64),
            ..Default::default()
        })
    }
}

#[test]
fn sweep_skips_done_reruns_failed_and_unfinished() {
    let (d, p) = experiment("grid:\n  lora.rank: [1, 2, 4]\n");
    let out = d.path().join("results");
    let exp = load_experiment(&p, &[]).unwrap();
    let runs = config::expand(&exp).unwrap();
    let cancel = AtomicBool::new(false);

    let t = Double {
        calls: Mutex::new(vec![]),
        fail: vec![2],
        panic_on: None,
    };
    let o = run_sweep(&exp, &runs, &t, &cancel, |_| {}).unwrap();
    assert_eq!((o.done.len(), o.failed.len(), o.skipped.len()), (2, 1, 0));
    assert!(o.failed[0].1.contains("out of memory"));
    let status = tuna::sweep::RunDir::new(&out, "t", &runs[1].id)
        .status()
        .unwrap();
    assert_eq!(status.state, State::Failed);
    assert!(status.error.unwrap().contains("out of memory at rank 2"));

    // A run killed mid-way leaves `running` behind: it must run again.
    tuna::sweep::RunDir::new(&out, "t", &runs[2].id)
        .set_status(State::Running, None)
        .unwrap();
    let t = Double {
        calls: Mutex::new(vec![]),
        fail: vec![],
        panic_on: None,
    };
    let o = run_sweep(&exp, &runs, &t, &cancel, |_| {}).unwrap();
    assert_eq!(o.skipped, vec![runs[0].id.clone()]);
    assert_eq!(
        *t.calls.lock().unwrap(),
        vec![runs[1].id.clone(), runs[2].id.clone()]
    );

    let table = Leaderboard::new(&out.join("leaderboard.csv"))
        .read()
        .unwrap();
    assert_eq!(table.rows.len(), 3);
    assert!(table.rows.iter().all(|r| r["status"] == "done"));
    let r2 = table.rows.iter().find(|r| r["lora.rank"] == "2").unwrap();
    assert_eq!(r2["final_train_loss"], "0.5");
}

#[test]
fn sweep_survives_a_panicking_trainer_and_stops_on_interrupt() {
    let (d, p) = experiment("grid:\n  lora.rank: [1, 2, 4]\n");
    let exp = load_experiment(&p, &[]).unwrap();
    let runs = config::expand(&exp).unwrap();
    let t = Double {
        calls: Mutex::new(vec![]),
        fail: vec![],
        panic_on: Some(1),
    };
    let o = run_sweep(&exp, &runs, &t, &AtomicBool::new(false), |_| {}).unwrap();
    assert_eq!(o.failed.len(), 1);
    assert!(o.failed[0].1.contains("panicked") && o.failed[0].1.contains("boom"));
    assert_eq!(o.done.len(), 2);

    struct Stop;
    impl Trainer for Stop {
        fn train(&self, _: &RunContext) -> anyhow::Result<RunMetrics> {
            Err(Interrupted.into())
        }
    }
    let o = run_sweep(&exp, &runs, &Stop, &AtomicBool::new(false), |_| {}).unwrap();
    assert!(o.interrupted);
    let st = tuna::sweep::RunDir::new(&d.path().join("results"), "t", &runs[0].id)
        .status()
        .unwrap();
    assert_eq!(st.state, State::Interrupted);
}

// ---- the leaderboard ----

fn row(exp: &str, id: &str, varied: &[(&str, &str)]) -> tuna::sweep::leaderboard::Row {
    tuna::sweep::leaderboard::Row {
        run_id: id.into(),
        experiment: exp.into(),
        status: State::Done,
        varied: varied
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        seed: 0,
        fingerprints: None,
        metrics: RunMetrics {
            best_val_loss: Some(1.25),
            ..Default::default()
        },
    }
}

#[test]
fn leaderboard_header_is_the_union_and_rows_keep_their_values() {
    let d = tempfile::tempdir().unwrap();
    let b = Leaderboard::new(&d.path().join("leaderboard.csv"));
    b.upsert(&row("a", "1", &[("lora.rank", "4")])).unwrap();
    b.upsert(&row("b", "2", &[("train.learning_rate", "2e-5")]))
        .unwrap();
    b.upsert(&row("a", "1", &[("lora.rank", "8")])).unwrap();
    let t = b.read().unwrap();
    assert_eq!(
        &t.header[..5],
        [
            "run_id",
            "experiment",
            "status",
            "lora.rank",
            "train.learning_rate"
        ]
    );
    assert_eq!(t.header[5], "seed");
    assert!(
        t.header.contains(&"best_val_loss".to_string())
            && t.header.contains(&"tokens_per_s".to_string())
    );
    assert_eq!(t.rows.len(), 2, "upsert replaces the row of the same run");
    assert_eq!(t.rows[0]["lora.rank"], "8");
    assert_eq!(t.rows[0]["train.learning_rate"], "");
    assert_eq!(t.rows[1]["train.learning_rate"], "2e-5");
    assert_eq!(t.rows[1]["best_val_loss"], "1.25");
}

#[test]
fn leaderboard_survives_concurrent_writers() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("leaderboard.csv");
    std::thread::scope(|s| {
        for w in 0..8 {
            let path = path.clone();
            s.spawn(move || {
                let b = Leaderboard::new(&path);
                for i in 0..10 {
                    let key = format!("k{w}");
                    b.upsert(&row(&format!("e{w}"), &i.to_string(), &[(&key, "x")]))
                        .unwrap();
                }
            });
        }
    });
    let t = Leaderboard::new(&path).read().unwrap();
    assert_eq!(t.rows.len(), 80, "no writer lost another's rows");
    assert!((0..8).all(|w| t.header.contains(&format!("k{w}"))));
    assert!(
        !std::fs::read_dir(d.path()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp"))
    );
}

// ---- checks that need the whole config, and bookkeeping failures ----

#[test]
fn adam_betas_must_be_below_one() {
    let e = err("train:\n  beta2: 1.0\n");
    assert_names(
        &e,
        "exp.yaml",
        7,
        Some("train.beta2"),
        &["expected a number in [0, 1)"],
    );
}

#[test]
fn weight_decay_needs_adamw() {
    let e = err("train:\n  optimizer: adam\n  weight_decay: 0.01\n");
    assert_names(
        &e,
        "exp.yaml",
        8,
        Some("train.weight_decay"),
        &["has no weight decay", "optimizer: adamw"],
    );
    assert_eq!(
        plan("train:\n  optimizer: adamw\n  weight_decay: 0.01\n").len(),
        1
    );
}

#[test]
fn a_run_whose_status_cannot_be_written_fails_alone() {
    let (d, p) = experiment("grid:\n  lora.rank: [1, 2, 4]\n");
    let exp = load_experiment(&p, &[]).unwrap();
    let runs = config::expand(&exp).unwrap();
    // The second run's status.json is a folder that is not empty: every write of it fails,
    // as it would on a full or read-only disk.
    let blocked = d
        .path()
        .join("results/t")
        .join(&runs[1].id)
        .join("status.json");
    std::fs::create_dir_all(blocked.join("x")).unwrap();
    let t = Double {
        calls: Mutex::new(vec![]),
        fail: vec![],
        panic_on: None,
    };
    let o = run_sweep(&exp, &runs, &t, &AtomicBool::new(false), |_| {}).unwrap();
    assert_eq!(o.done, vec![runs[0].id.clone(), runs[2].id.clone()]);
    assert_eq!(o.failed.len(), 1, "{o:?}");
    assert!(o.failed[0].1.contains("status.json"), "{o:?}");
    let names: Vec<String> = std::fs::read_dir(blocked.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.ends_with(".tmp")),
        "no temporary files left: {names:?}"
    );
}

#[test]
fn run_ids_do_not_change_when_new_keys_are_left_unset() {
    // The example report's runs: a sweep of the same experiment, with the same data and model,
    // must find them by id (config, data and model fingerprints), keys added since included.
    let exp = load_experiment(Path::new("experiments/diagnosis.yaml"), &[]).unwrap();
    let board = std::fs::read_to_string("docs/example-report/leaderboard.csv").unwrap();
    let mut runs = config::expand(&exp).unwrap();
    tuna::sweep::identity::assign_ids(&mut runs, tuna::sweep::identity::Resolve::Offline).unwrap();
    for run in &runs {
        assert!(board.contains(&run.id), "{} is not in {board}", run.id);
        let fp = run.fingerprints.as_ref().unwrap();
        assert!(
            board.contains(&format!("{},{}", fp.data, fp.model)),
            "{fp:?}"
        );
    }
    // Setting a new key does make a new run.
    let q = load_experiment(
        Path::new("experiments/diagnosis.yaml"),
        &["quantize.bits=4".into()],
    )
    .unwrap();
    let mut quantized = config::expand(&q).unwrap();
    tuna::sweep::identity::assign_ids(&mut quantized, tuna::sweep::identity::Resolve::Offline)
        .unwrap();
    for run in &quantized {
        assert!(!board.contains(&run.id));
    }
}
