//! The trainer end to end on the reference tiny models (CPU): its loss against PEFT's, fusing
//! against PEFT's merged model, a sweep that learns, and kill -9 + resume.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burn::tensor::{DType, Device};
use common::{Expected, reference_dir};
use tuna::data::dataset::{Tokenized, collate};
use tuna::model::load::build_model;
use tuna::model::lora::load_adapter;
use tuna::source::base::load_base;
use tuna::train::step::eval_loss;

fn loss_of(model: &tuna::model::llama::Llama, exp: &Expected, prefix: &str) -> f64 {
    let ids: Vec<u32> = exp
        .i64(&format!("{prefix}.lora.ids"))
        .iter()
        .map(|&i| i as u32)
        .collect();
    let prompt_len = exp.i64(&format!("{prefix}.lora.prompt_len"))[0] as usize;
    let ex = Tokenized { ids, prompt_len };
    let b = collate(&[&ex], 0, 1);
    eval_loss(model, &b).0.into_scalar::<f32>() as f64
}

#[test]
fn trainer_loss_and_fuse_match_peft() {
    let exp = Expected::load();
    for name in ["tiny-llama", "tiny-qwen2"] {
        let dir = reference_dir();
        let base = load_base(dir.join(name).to_str().unwrap()).unwrap();
        let mut model =
            build_model(&base.config, &base.weights, &Device::flex(), DType::F32).unwrap();
        load_adapter(&mut model, &dir.join(format!("{name}-lora"))).unwrap();
        let want = exp.f64(&format!("{name}.lora.loss"))[0];
        let got = loss_of(&model, &exp, name);
        assert!(
            ((got - want) / want).abs() < 1e-4,
            "{name}: trainer loss {got} vs PEFT {want}"
        );

        // tuna fuse writes an HF folder whose plain forward gives PEFT's merged loss.
        let out = tempfile::tempdir().unwrap();
        let ty = tuna::export::fuse::fuse(
            &base,
            &dir.join(format!("{name}-lora")),
            out.path(),
            Default::default(),
        )
        .unwrap();
        assert_eq!(
            ty,
            tuna::formats::safetensors::FloatType::F32,
            "the reference base is float32"
        );
        let fused = load_base(out.path().to_str().unwrap()).unwrap();
        let model =
            build_model(&fused.config, &fused.weights, &Device::flex(), DType::F32).unwrap();
        let want = exp.f64(&format!("{name}.lora.merged_loss"))[0];
        let got = loss_of(&model, &exp, name);
        assert!(
            ((got - want) / want).abs() < 1e-4,
            "{name}: fused loss {got} vs PEFT merged {want}"
        );
        assert_eq!(
            fused.tokenizer.encode("The capital of France is", false),
            base.tokenizer.encode("The capital of France is", false)
        );
    }
}

fn tuna() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tuna"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

/// An experiment on tiny-llama and the diagnosis data, in a fresh folder.
fn experiment(dir: &Path, extra: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = format!(
        "name: resume\nmodel: {}\ndata: {}\ndevice: cpu\n\
         train:\n  iters: 400\n  batch_size: 2\n  learning_rate: 5e-3\n  optimizer: adamw\n  mask_prompt: true\n  \
         max_seq_length: 128\n  steps_per_report: 50\n  steps_per_eval: 100\n  val_batches: 3\n  save_every: 10\n\
         lora:\n  num_layers: -1\n  rank: 4\n  dropout: 0.05\neval:\n  test: true\noutput:\n  dir: {}\n{extra}",
        reference_dir().join("tiny-llama").display(),
        root.join("experiments/data/diagnosis").display(),
        dir.join("out").display(),
    );
    let p = dir.join("exp.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

fn run_folder(out: &Path) -> PathBuf {
    let exp_dir = out.join("resume");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&exp_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 1, "one run expected in {}", exp_dir.display());
    dirs.pop().unwrap()
}

/// The validation losses a run logged, in order.
fn val_losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "val")
        .map(|v| v["val_loss"].as_f64().unwrap())
        .collect()
}

fn metrics(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap()
}

#[test]
fn sweep_learns_and_a_killed_run_resumes_to_the_same_result() {
    // Uninterrupted.
    let a = tempfile::tempdir().unwrap();
    let spec = experiment(a.path(), "");
    let out = tuna()
        .args(["sweep", spec.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run_a = run_folder(&a.path().join("out"));
    let ma = metrics(&run_a);
    let log: Vec<serde_json::Value> = std::fs::read_to_string(run_a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let vals: Vec<f64> = log
        .iter()
        .filter(|v| v["kind"] == "val")
        .map(|v| v["val_loss"].as_f64().unwrap())
        .collect();
    assert_eq!(vals.len(), 5, "val at steps 0, 100, 200, 300, 400");
    assert!(
        vals[4] < vals[0] * 0.8,
        "validation loss must fall: {vals:?}"
    );
    assert!(ma["test_ppl"].as_f64().unwrap() > 1.0);
    // Ranking: the untrained model's loss is the baseline, not the best; the best adapter is kept.
    assert_eq!(ma["base_val_loss"].as_f64().unwrap(), vals[0]);
    let best = vals[1..].iter().cloned().fold(f64::INFINITY, f64::min);
    assert_eq!(ma["best_val_loss"].as_f64().unwrap(), best);
    let best_step = ma["best_val_step"].as_u64().unwrap();
    assert_eq!(vals[(best_step / 100) as usize], best);
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run_a.join("adapter-best/step.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["step"].as_u64(), Some(best_step));
    assert!(
        run_a
            .join("adapter-best/adapter_model.safetensors")
            .exists()
    );
    assert!(run_a.join("adapter/adapter_model.safetensors").exists());
    let mlx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run_a.join("adapter-mlx/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        mlx["num_layers"], 2,
        "every run also writes an mlx-lm adapter"
    );
    assert_eq!(mlx["lora_parameters"]["rank"], 4);
    assert!(
        !run_a.join("checkpoint").exists(),
        "a finished run drops its checkpoint"
    );

    // Killed with SIGKILL after a checkpoint, then resumed by a second sweep.
    let b = tempfile::tempdir().unwrap();
    let spec = experiment(b.path(), "");
    let mut child = tuna()
        .args(["sweep", spec.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_checkpoint(&b.path().join("out/resume"), &mut child, 30);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let run_b = run_folder(&b.path().join("out"));
    let status = std::fs::read_to_string(run_b.join("status.json")).unwrap();
    assert!(status.contains("running"), "killed mid-run: {status}");

    let out = tuna()
        .args(["sweep", spec.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resuming run"), "{err}");
    let mb = metrics(&run_b);
    for k in [
        "final_train_loss",
        "final_val_loss",
        "best_val_loss",
        "test_loss",
    ] {
        assert_eq!(
            ma[k], mb[k],
            "{k}: uninterrupted {} vs resumed {}",
            ma[k], mb[k]
        );
    }
    let adapter = |r: &Path| std::fs::read(r.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        adapter(&run_a) == adapter(&run_b),
        "the resumed adapter differs from the uninterrupted one"
    );

    // A third sweep finds it done.
    let out = tuna()
        .args(["sweep", spec.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("done already, skipped"));
}

/// Waits until the run's checkpoint has reached `step`.
fn wait_for_checkpoint(exp_dir: &Path, child: &mut std::process::Child, step: u64) {
    let started = Instant::now();
    loop {
        let state = std::fs::read_dir(exp_dir)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| {
                std::fs::read_to_string(e.unwrap().path().join("checkpoint/state.json")).ok()
            });
        if let Some(s) = state
            && serde_json::from_str::<serde_json::Value>(&s).unwrap()["step"]
                .as_u64()
                .unwrap()
                >= step
        {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished before the signal; make it longer"
        );
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} failed");
}

#[test]
fn sigterm_stops_cleanly_and_a_second_interrupt_still_marks_the_run() {
    let d = tempfile::tempdir().unwrap();
    let spec = experiment(d.path(), "");
    let exp_dir = d.path().join("out/resume");
    let status =
        || std::fs::read_to_string(run_folder(&d.path().join("out")).join("status.json")).unwrap();

    // SIGTERM (what `kill` and schedulers send): checkpoint, mark interrupted, exit 1.
    let mut child = tuna()
        .args(["sweep", spec.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_checkpoint(&exp_dir, &mut child, 20);
    signal(&child, "-TERM");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted; run `tuna sweep` again"), "{err}");
    assert!(status().contains("interrupted"), "{}", status());

    // Two Ctrl-Cs in a row exit at once (130), and the run still reads `interrupted`, not
    // `running`. If the first one already finished the step, the exit is the clean one (1);
    // `tests/spec.rs` checks the exit-at-once path deterministically.
    let mut child = tuna()
        .args(["sweep", spec.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_checkpoint(&exp_dir, &mut child, 40);
    signal(&child, "-INT");
    signal(&child, "-INT");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(130) || out.status.code() == Some(1),
        "{:?}: {err}",
        out.status
    );
    assert!(status().contains("interrupted"), "{}", status());
    let board = std::fs::read_to_string(d.path().join("out/leaderboard.csv")).unwrap();
    assert!(board.contains("interrupted"), "{board}");
    assert!(!board.contains("running"), "{board}");
}

#[test]
fn bad_runs_fail_with_a_message_and_the_sweep_goes_on() {
    let d = tempfile::tempdir().unwrap();
    let spec = experiment(d.path(), "grid:\n  lora.num_layers: [5, 1]\n");
    std::fs::write(
        &spec,
        std::fs::read_to_string(&spec)
            .unwrap()
            .replace("iters: 400", "iters: 2"),
    )
    .unwrap();
    let out = tuna()
        .args(["sweep", spec.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed run makes the sweep exit 1: {err}"
    );
    assert!(
        err.contains("lora.num_layers is 5 but") && err.contains("has 2 layers"),
        "{err}"
    );
    assert!(err.contains("1 done") && err.contains("1 failed"), "{err}");

    // The same experiment pointed at another data folder; returns what the sweep printed.
    let spec = experiment(d.path(), "");
    let text = std::fs::read_to_string(&spec).unwrap();
    let diagnosis = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/data/diagnosis");
    let sweep_with_data = |data: &Path| {
        let swapped = text.replace(
            &format!("data: {}", diagnosis.display()),
            &format!("data: {}", data.display()),
        );
        std::fs::write(&spec, swapped).unwrap();
        let out = tuna()
            .args(["sweep", spec.to_str().unwrap()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = sweep_with_data(&d.path().join("nowhere"));
    assert!(
        err.contains("nowhere") && err.contains("does not exist"),
        "{err}"
    );

    let data = d.path().join("bad");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("train.jsonl"), "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n{\"text\": 1}\n").unwrap();
    std::fs::write(data.join("valid.jsonl"), "{\"text\": \"x\"}\n").unwrap();
    let err = sweep_with_data(&data);
    assert!(err.contains("train.jsonl:2"), "{err}");
}

#[test]
fn max_seq_length_beyond_the_model_positions_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let spec = experiment(d.path(), "");
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("max_seq_length: 128", "max_seq_length: 100000");
    std::fs::write(&spec, text).unwrap();
    let out = tuna()
        .args(["sweep", spec.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("train.max_seq_length is 100000") && err.contains("max_position_embeddings"),
        "{err}"
    );
}

#[test]
fn qlora_sweep_trains_a_base_quantized_at_load() {
    let d = tempfile::tempdir().unwrap();
    let spec = experiment(
        d.path(),
        "quantize:\n  bits: 4\n  group_size: 32\ngrid:\n  quantize.bits: [4, 3]\n",
    );
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("iters: 400", "iters: 100");
    std::fs::write(&spec, text).unwrap();
    let out = tuna()
        .args(["sweep", spec.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("1 done") && err.contains("1 failed"),
        "4 bits trains, 3 bits is refused: {err}"
    );
    assert!(err.contains("quantize.bits is 3; use 2, 4 or 8"), "{err}");
    let board = std::fs::read_to_string(d.path().join("out/leaderboard.csv")).unwrap();
    let row = board.lines().find(|l| l.contains(",done,")).unwrap();
    println!("{board}");
    // The run learned: its validation loss ended below the base model's (step 0).
    let runs: Vec<_> = std::fs::read_dir(d.path().join("out/resume"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("metrics.jsonl").exists() && p.join("adapter").exists())
        .collect();
    assert_eq!(runs.len(), 1, "{row}");
    let vals = val_losses(&runs[0]);
    assert!(
        vals.last().unwrap() < &(vals[0] * 0.95),
        "QLoRA validation loss must fall: {vals:?}"
    );
}

#[test]
fn dora_sweep_learns_and_saves_a_peft_dora_adapter() {
    let d = tempfile::tempdir().unwrap();
    let spec = experiment(d.path(), "");
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("iters: 400", "iters: 100")
        .replace("  rank: 4\n", "  rank: 4\n  fine_tune_type: dora\n");
    std::fs::write(&spec, text).unwrap();
    let out = tuna()
        .args(["sweep", spec.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let run = run_folder(&d.path().join("out"));
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["use_dora"], true);
    let vals = val_losses(&run);
    assert!(
        vals.last().unwrap() < &(vals[0] * 0.95),
        "DoRA validation loss must fall: {vals:?}"
    );
}

#[test]
fn sweep_takes_device_and_dtype_like_eval_and_generate() {
    let d = tempfile::tempdir().unwrap();
    let spec = experiment(d.path(), "");
    let out = tuna()
        .args(["sweep", spec.to_str().unwrap(), "--device", "gpu"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--device `gpu`") && err.contains("vulkan"),
        "{err}"
    );
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("iters: 400", "iters: 2")
        .replace("device: cpu\n", "device: auto\n");
    std::fs::write(&spec, text).unwrap();
    let out = tuna()
        .args([
            "train",
            spec.to_str().unwrap(),
            "--device",
            "cpu",
            "--dtype",
            "f32",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config =
        std::fs::read_to_string(run_folder(&d.path().join("out")).join("config.yaml")).unwrap();
    assert!(
        config.contains("device: cpu") && config.contains("dtype: f32"),
        "{config}"
    );
}

#[test]
fn full_fine_tuning_sweep_learns_saves_for_mlx_lm_and_fuses() {
    let d = tempfile::tempdir().unwrap();
    let spec = experiment(d.path(), "");
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("iters: 400", "iters: 60")
        .replace("learning_rate: 5e-3", "learning_rate: 1e-3")
        .replace(
            "  num_layers: -1\n",
            "  num_layers: 1\n  fine_tune_type: full\n",
        );
    std::fs::write(&spec, text).unwrap();
    let out = tuna()
        .args(["sweep", spec.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let run = run_folder(&d.path().join("out"));
    let adapter = run.join("adapter");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["fine_tune_type"], "full");
    assert!(
        !run.join("adapter-mlx").exists(),
        "the full fine-tune is already mlx-lm's form"
    );
    let vals = val_losses(&run);
    assert!(
        vals.last().unwrap() < &(vals[0] * 0.95),
        "full fine-tuning must lower the validation loss: {vals:?}"
    );

    // The saved blocks load onto the base for evaluation, and fusing them gives the same model.
    let base_dir = reference_dir().join("tiny-llama");
    let base = load_base(base_dir.to_str().unwrap()).unwrap();
    let mut tuned = build_model(&base.config, &base.weights, &Device::flex(), DType::F32).unwrap();
    load_adapter(&mut tuned, &adapter).unwrap();
    let fused_dir = d.path().join("fused");
    tuna::export::fuse::fuse(&base, &adapter, &fused_dir, Default::default()).unwrap();
    let fused = load_base(fused_dir.to_str().unwrap()).unwrap();
    let fused = build_model(&fused.config, &fused.weights, &Device::flex(), DType::F32).unwrap();
    let exp = Expected::load();
    let (a, b) = (
        loss_of(&tuned, &exp, "tiny-llama"),
        loss_of(&fused, &exp, "tiny-llama"),
    );
    assert!((a - b).abs() < 1e-5, "adapter {a} vs fused {b}");
    let plain = build_model(&base.config, &base.weights, &Device::flex(), DType::F32).unwrap();
    assert!(
        (loss_of(&plain, &exp, "tiny-llama") - a).abs() > 1e-3,
        "the blocks changed"
    );
}

#[test]
fn early_stopping_sweep_spends_fewer_steps_than_the_grid() {
    let tmp = tempfile::tempdir().unwrap();
    // The first run learns; the two with a tiny learning rate barely move and are stopped at
    // the first rung, where they are not within the best third.
    let spec = experiment(
        tmp.path(),
        "early_stop:\n  method: asha\n  min_steps: 10\n  reduction_factor: 3\n\
         grid:\n  train.learning_rate: [5e-3, 1e-6, 2e-6]\n",
    );
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("iters: 400", "iters: 90")
        .replace("steps_per_eval: 100", "steps_per_eval: 30")
        .replace("steps_per_report: 50", "steps_per_report: 10");
    std::fs::write(&spec, text).unwrap();
    let out = tuna()
        .args(["sweep", spec.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let table = tuna::sweep::Leaderboard::new(&tmp.path().join("out/leaderboard.csv"))
        .read()
        .unwrap();
    assert_eq!(table.rows.len(), 3);
    let mut spent = 0;
    for r in &table.rows {
        match r["status"].as_str() {
            "done" => spent += 90,
            "pruned" => spent += r["stopped_step"].parse::<u64>().unwrap(),
            other => panic!("status {other}"),
        }
    }
    let pruned = table
        .rows
        .iter()
        .filter(|r| r["status"] == "pruned")
        .count();
    assert_eq!(pruned, 2, "{:?}", table.rows);
    assert!(spent < 3 * 90, "{spent} steps");
    assert!(err.contains("stopped early: asha rung at step 10"), "{err}");
}
