//! The LoRA trainer behind `tuna train` and `tuna sweep`: data → model on a device →
//! adapters → optimizer loop with schedule, accumulation, clipping, evaluation, checkpoints
//! and resume → PEFT adapter + metrics in the run folder.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::{DType, Int, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::checkpoint::{self, Checkpoint};
use super::metrics::{MetricsLog, peak_rss_mb};
use super::settings::TrainSettings;
use crate::data::dataset::{self, Batch, DataSet, Order, Split, Tokenized};
use crate::generate::answers::{self, TaskMetric};
use crate::model::base::{BaseModel, load_base};
use crate::model::device::{DeviceChoice, SelectedDevice, select_device};
use crate::model::llama::Llama;
use crate::model::load::build_model;
use crate::model::lora::{self, AdamW};
use crate::sweep::RunMetrics;
use crate::sweep::executor::{Interrupted, RunContext, Trainer};

/// Sequence lengths are padded to a multiple of this: fewer distinct shapes, fewer GPU
/// kernel compiles and autotune runs across the steps and runs of a sweep.
const SEQ_ROUND: usize = 32;

/// Trains runs one after another, keeping the last base model in memory so that a sweep
/// loads (and, for GGUF, dequantizes) it once.
#[derive(Default)]
pub struct LoraTrainer {
    cache: Mutex<Option<(String, Arc<BaseModel>)>>,
    /// Print report lines even without a terminal (tests keep this off).
    pub quiet: bool,
}

impl LoraTrainer {
    pub fn base(&self, spec: &str) -> Result<Arc<BaseModel>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, m)) = cache.as_ref()
            && s == spec
        {
            return Ok(m.clone());
        }
        let started = Instant::now();
        let m = Arc::new(load_base(spec).with_context(|| format!("loading model `{spec}`"))?);
        eprintln!(
            "loaded {} in {:.1} s",
            m.path.display(),
            started.elapsed().as_secs_f64()
        );
        *cache = Some((spec.to_string(), m.clone()));
        Ok(m)
    }
}

/// Picks the device and float type a config asks for.
pub fn device_for(device: &str, dtype: &str) -> Result<SelectedDevice> {
    let choice: DeviceChoice = device.parse()?;
    let mut sel = select_device(choice)?;
    sel.dtype = match dtype {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => sel.dtype,
    };
    if !sel.device.supports_dtype(sel.dtype) {
        bail!(
            "dtype {:?} is not supported on the {} device; use dtype: auto",
            sel.dtype,
            sel.kind
        );
    }
    Ok(sel)
}

impl Trainer for LoraTrainer {
    fn train(&self, ctx: &RunContext) -> Result<RunMetrics> {
        let s = TrainSettings::from_config(&ctx.plan.config)?;
        let base = self.base(&s.model)?;
        check_layers(&s, &base)?;
        let data = dataset::load(
            Path::new(&s.data),
            &base.tokenizer,
            s.max_seq_length,
            s.mask_prompt,
        )?;
        for split in [Some(&data.train), Some(&data.valid), data.test.as_ref()]
            .into_iter()
            .flatten()
        {
            if split.truncated > 0 {
                eprintln!(
                    "note: {}: {} examples were longer than train.max_seq_length ({}) and were truncated; {} of them lost their whole answer and are not used",
                    split.path.display(),
                    split.truncated,
                    s.max_seq_length,
                    split.dropped
                );
            }
        }
        let sel = device_for(&s.device, &s.dtype)?;
        let mut model = build_model(&base.config, &base.weights, &sel.device, sel.dtype)?;
        lora::apply_lora(&mut model, &s.lora, s.seed)?;
        let pad = base
            .tokenizer
            .pad_token_id()
            .or(base.tokenizer.eos_token_id())
            .unwrap_or(0);
        let metric = TaskMetric::from_spec(&s.metric, &s.regex)?;
        let questions = answers::questions(
            data.test.as_ref().map(|t| t.path.as_path()),
            s.generate,
            &s.prompts,
            &base.tokenizer,
        )?;
        // Fresh adapters have B = 0, so this model still answers exactly as the base model.
        let base_file = ctx
            .dir
            .path
            .parent()
            .map(|p| p.join("base_generations.jsonl"));
        if let Some(base_file) = base_file.filter(|f| !questions.is_empty() && !f.exists()) {
            eprintln!(
                "answering {} prompt(s) with the base model",
                questions.len()
            );
            let mut base_answers =
                answers::answer(&model, &base.tokenizer, &questions, s.max_tokens)?;
            if let Some(m) = &metric {
                let score = m.apply(&mut base_answers);
                answers::write_score(&base_file.with_file_name("base_metrics.json"), m, score)?;
            }
            answers::write(&base_file, &base_answers)?;
        }
        let run = Run {
            s: &s,
            data: &data,
            pad,
            sel: &sel,
            ctx,
            quiet: self.quiet,
        };
        let mut metrics = run.train(&mut model)?;
        if !questions.is_empty() {
            let mut tuned = answers::answer(&model, &base.tokenizer, &questions, s.max_tokens)?;
            if let Some(m) = &metric {
                metrics.task_score = m.apply(&mut tuned);
                metrics.task_metric = Some(m.name().to_string());
            }
            answers::write(&ctx.dir.path.join("generations.jsonl"), &tuned)?;
        }
        Ok(metrics)
    }
}

fn check_layers(s: &TrainSettings, base: &BaseModel) -> Result<()> {
    let n = base.config.num_hidden_layers as i64;
    if s.lora.num_layers > n {
        bail!(
            "lora.num_layers is {} but {} has {n} layers; use a number up to {n}, or -1 for all",
            s.lora.num_layers,
            s.model
        );
    }
    Ok(())
}

struct Run<'a> {
    s: &'a TrainSettings,
    data: &'a DataSet,
    pad: u32,
    sel: &'a SelectedDevice,
    ctx: &'a RunContext<'a>,
    quiet: bool,
}

/// Loss and target-token count of one batch.
pub struct BatchLoss {
    pub loss: Tensor<1>,
    pub targets: usize,
}

impl Run<'_> {
    fn batch_loss(&self, model: &Llama, b: &Batch) -> BatchLoss {
        batch_loss(model, b)
    }

    /// Token-weighted mean loss over up to `max_batches` batches of a split (-1 = all).
    fn evaluate(&self, model: &mut Llama, split: &Split, max_batches: i64) -> Result<f64> {
        lora::set_trainable(model, false);
        model.training = false;
        let loss = split_loss(model, split, self.s.batch_size, self.pad, max_batches);
        lora::set_trainable(model, true);
        model.training = true;
        loss
    }

    fn train(&self, model: &mut Llama) -> Result<RunMetrics> {
        let s = self.s;
        let dir = &self.ctx.dir.path;
        let order = Order::new(&self.data.train.examples, s.batch_size, s.seed);
        let mut opt = AdamW::new(
            s.schedule.learning_rate,
            if s.optimizer == "adamw" {
                s.weight_decay
            } else {
                0.0
            },
        );
        opt.beta1 = s.beta1;
        opt.beta2 = s.beta2;
        opt.eps = s.eps;

        let resumed = checkpoint::load(dir, model, &mut opt, self.ctx.plan.id.as_str())?;
        let start = resumed.as_ref().map_or(0, |c| c.step);
        let log = MetricsLog::open(dir, resumed.as_ref().map(|c| c.step))?;
        let mut best_val = resumed.as_ref().and_then(|c| c.best_val_loss);
        let mut last_val = resumed.as_ref().and_then(|c| c.last_val_loss);
        let mut trained_tokens = resumed.as_ref().map_or(0, |c| c.trained_tokens);
        if let Some(c) = &resumed {
            eprintln!(
                "resuming run {} from its checkpoint at step {}",
                self.ctx.plan.id, c.step
            );
        }
        model.training = true;
        lora::set_trainable(model, true);
        if s.grad_checkpoint {
            lora::set_gradient_checkpointing(model, true);
        }

        let pb = progress(s.iters, start, self.quiet);
        let started = Instant::now();
        let mut window = Window::default();
        let mut last_train_loss = resumed.as_ref().and_then(|c| c.last_train_loss);
        let mut speed_tokens = 0usize;
        let mut speed_time = 0.0f64;

        if start == 0 {
            let v = self.evaluate(model, &self.data.valid, s.val_batches)?;
            log.log("val", 0, json!({"val_loss": v}))?;
            say(&pb, self.quiet, &format!("step 0: val loss {v:.4}"));
            best_val = Some(v);
            last_val = Some(v);
        }

        for step in start..s.iters {
            if self.ctx.cancel.load(Ordering::SeqCst) {
                pb.abandon();
                return Err(Interrupted.into());
            }
            let t0 = Instant::now();
            let lr = s.schedule.lr_at(step);
            opt.lr = lr;
            let mut grads: Option<Vec<(String, Tensor<2>)>> = None;
            let (mut loss_sum, mut targets, mut tokens) = (0.0f64, 0usize, 0usize);
            for micro in 0..s.grad_accumulation {
                let idx = order.at(step * s.grad_accumulation + micro);
                let exs: Vec<&Tokenized> =
                    idx.iter().map(|&i| &self.data.train.examples[i]).collect();
                let b = dataset::collate(&exs, self.pad, SEQ_ROUND);
                let bl = self.batch_loss(model, &b);
                let g = bl.loss.backward();
                let micro_grads = lora::lora_gradients(model, &g);
                let v = bl.loss.into_scalar::<f32>() as f64;
                if !v.is_finite() {
                    bail!(
                        "the training loss became {v} at step {} (lr {lr:.2e}); lower train.learning_rate or set train.grad_clip",
                        step + 1
                    );
                }
                loss_sum += v * bl.targets as f64;
                targets += bl.targets;
                tokens += b.tokens();
                let scale = 1.0 / s.grad_accumulation as f64;
                grads = Some(match grads {
                    None => micro_grads
                        .into_iter()
                        .map(|(n, g)| (n, g.mul_scalar(scale)))
                        .collect(),
                    Some(acc) => acc
                        .into_iter()
                        .zip(micro_grads)
                        .map(|((n, a), (_, g))| (n, a + g.mul_scalar(scale)))
                        .collect(),
                });
            }
            let mut grads = grads.unwrap_or_default();
            if let Some(max_norm) = s.grad_clip {
                clip_global_norm(&mut grads, max_norm);
            }
            opt.step(model, &grads);
            let loss = loss_sum / targets.max(1) as f64;
            window.add(loss);
            trained_tokens += tokens as u64;
            speed_tokens += tokens;
            speed_time += t0.elapsed().as_secs_f64();
            last_train_loss = Some(loss);
            let done = step + 1;
            pb.set_position(done);
            pb.set_message(format!("loss {loss:.3}"));

            if done % s.steps_per_report == 0 || done == s.iters {
                let avg = window.take();
                let tps = speed_tokens as f64 / speed_time.max(1e-9);
                let its = (done - start) as f64 / started.elapsed().as_secs_f64().max(1e-9);
                log.log(
                    "train",
                    done,
                    json!({"train_loss": avg, "lr": lr, "it_per_s": its, "tokens_per_s": tps,
                           "trained_tokens": trained_tokens, "peak_mem_mb": peak_rss_mb()}),
                )?;
                say(
                    &pb,
                    self.quiet,
                    &format!(
                        "step {done}: train loss {avg:.4}, lr {lr:.2e}, {its:.2} it/s, {tps:.0} tok/s, {trained_tokens} tokens, peak mem {:.0} MB",
                        peak_rss_mb().unwrap_or(0.0)
                    ),
                );
            }
            if done % s.steps_per_eval == 0 || done == s.iters {
                let v = self.evaluate(model, &self.data.valid, s.val_batches)?;
                log.log("val", done, json!({"val_loss": v}))?;
                say(&pb, self.quiet, &format!("step {done}: val loss {v:.4}"));
                best_val = Some(best_val.map_or(v, |b: f64| b.min(v)));
                last_val = Some(v);
            }
            let stopping = self.ctx.cancel.load(Ordering::SeqCst);
            if (done % s.save_every == 0 || stopping) && done < s.iters {
                let c = Checkpoint {
                    step: done,
                    run_id: self.ctx.plan.id.clone(),
                    trained_tokens,
                    best_val_loss: best_val,
                    last_val_loss: last_val,
                    last_train_loss,
                    seed: s.seed,
                    batches_per_epoch: order.batches_per_epoch(),
                };
                checkpoint::save(dir, model, &opt, &c)?;
                if stopping {
                    say(
                        &pb,
                        self.quiet,
                        &format!("Ctrl-C: checkpoint saved at step {done}"),
                    );
                }
            }
        }
        pb.finish_and_clear();

        lora::set_trainable(model, false);
        model.training = false;
        lora::save_peft_adapter(model, &dir.join("adapter"), Some(&s.model))?;
        let (test_loss, test_ppl) = match (&self.data.test, s.test) {
            (Some(test), true) => {
                let t = self.evaluate(model, test, s.test_batches)?;
                log.log(
                    "test",
                    s.iters,
                    json!({"test_loss": t, "test_ppl": t.exp()}),
                )?;
                say(
                    &pb,
                    self.quiet,
                    &format!("test loss {t:.4}, perplexity {:.3}", t.exp()),
                );
                (Some(t), Some(t.exp()))
            }
            _ => (None, None),
        };
        checkpoint::remove(dir);
        Ok(RunMetrics {
            final_train_loss: last_train_loss,
            best_val_loss: best_val,
            final_val_loss: last_val,
            test_loss,
            test_ppl,
            tokens_per_s: (speed_time > 0.0).then(|| speed_tokens as f64 / speed_time),
            peak_mem_mb: peak_rss_mb(),
            wall_s: None,
            backend: Some(self.sel.kind.to_string()),
            device: Some(device_name(&self.sel.device)),
            task_metric: None,
            task_score: None,
        })
    }
}

/// Token-weighted mean loss over up to `max_batches` length-grouped batches of a split
/// (-1 = all), with the model as it is (call with adapters frozen and `training` off).
pub fn split_loss(
    model: &Llama,
    split: &Split,
    batch_size: usize,
    pad: u32,
    max_batches: i64,
) -> Result<f64> {
    let groups = dataset::length_groups(&split.examples, batch_size);
    let take = if max_batches < 0 {
        groups.len()
    } else {
        (max_batches as usize).min(groups.len())
    };
    let (mut sum, mut count) = (0.0f64, 0usize);
    for g in &groups[..take] {
        let exs: Vec<&Tokenized> = g.iter().map(|&i| &split.examples[i]).collect();
        let b = dataset::collate(&exs, pad, SEQ_ROUND);
        let bl = batch_loss(model, &b);
        sum += bl.loss.into_scalar::<f32>() as f64 * bl.targets as f64;
        count += bl.targets;
    }
    if count == 0 {
        bail!(
            "{}: no target tokens to evaluate (are all answers cut by max_seq_length?)",
            split.path.display()
        );
    }
    Ok(sum / count as f64)
}

/// Mean next-token loss over a batch's targets. Only the positions that predict a
/// target go through `lm_head` (the largest matrix of a small model): with
/// `mask_prompt` that is a few tokens per example instead of the whole sequence.
pub fn batch_loss(model: &Llama, b: &Batch) -> BatchLoss {
    let ids = model.ids_tensor(&b.ids, b.batch);
    let dev = (&model.device, DType::F32);
    let attn = Tensor::<2>::from_data(TensorData::new(b.attention.clone(), [b.batch, b.seq]), dev);
    let (rows, targets) = target_positions(b);
    let n = targets.len();
    let h = model.run_layers(ids, Some(attn), None);
    let [bs, t, d] = h.dims();
    let idx = Tensor::<1, Int>::from_data(TensorData::new(rows, [n]), &model.device);
    let h = h.reshape([bs * t, d]).select(0, idx).reshape([1, n, d]);
    let logits = model.head(h);
    let vocab = logits.dims()[2];
    let logits = logits.reshape([n, vocab]).cast(DType::F32);
    let tgt = Tensor::<2, Int>::from_data(TensorData::new(targets, [n, 1]), &model.device);
    let logp = burn::tensor::activation::log_softmax(logits, 1).gather(1, tgt);
    BatchLoss {
        loss: logp.mean().neg().reshape([1]),
        targets: n,
    }
}

/// Flat `[B*T]` rows whose hidden state predicts a target, and those targets
/// (shifted as transformers does: position t-1 predicts token t).
pub fn target_positions(b: &Batch) -> (Vec<i64>, Vec<i64>) {
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for r in 0..b.batch {
        for t in 1..b.seq {
            if b.loss_mask[r * b.seq + t] > 0.0 {
                rows.push((r * b.seq + t - 1) as i64);
                targets.push(b.ids[r * b.seq + t] as i64);
            }
        }
    }
    (rows, targets)
}

/// A short device name for the leaderboard (`cpu (flex)`, `wgpu DiscreteGpu(0)`).
pub fn device_name(device: &burn::tensor::Device) -> String {
    let full = format!("{device:?}");
    if full.contains("Flex") {
        return "cpu (flex)".into();
    }
    match full
        .split_once("kind: ")
        .and_then(|(_, rest)| rest.split(',').next())
    {
        Some(kind) => format!("wgpu {kind}"),
        None => full,
    }
}

/// Scales all gradients so that their global L2 norm is at most `max_norm`.
pub fn clip_global_norm(grads: &mut [(String, Tensor<2>)], max_norm: f64) {
    if grads.is_empty() {
        return;
    }
    // One device reduction and one host sync per step, whatever the number of adapters.
    let total = grads
        .iter()
        .map(|(_, g)| g.clone().cast(DType::F32).square().sum())
        .reduce(|a, b| a + b)
        .map_or(0.0, |sq| (sq.into_scalar::<f32>() as f64).sqrt());
    if total > max_norm {
        let k = max_norm / (total + 1e-6);
        for (_, g) in grads.iter_mut() {
            *g = g.clone().mul_scalar(k);
        }
    }
}

/// Mean train loss over the steps since the last report (as mlx-lm reports it).
#[derive(Default)]
struct Window {
    sum: f64,
    n: usize,
}

impl Window {
    fn add(&mut self, loss: f64) {
        self.sum += loss;
        self.n += 1;
    }
    fn take(&mut self) -> f64 {
        let out = self.sum / self.n.max(1) as f64;
        *self = Window::default();
        out
    }
}

fn progress(total: u64, start: u64, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps {elapsed_precise} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_position(start);
    pb
}

/// A report line: above the bar on a terminal, plain on stderr otherwise.
fn say(pb: &ProgressBar, quiet: bool, line: &str) {
    if quiet {
        return;
    }
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_scales_to_the_global_norm() {
        let dev = burn::tensor::Device::flex();
        let t = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [1, 1]), &dev);
        // Global norm of (3, 4) is 5: clipped to 1 it becomes (0.6, 0.8).
        let mut g = vec![
            ("a".to_string(), t(vec![3.0])),
            ("b".to_string(), t(vec![4.0])),
        ];
        clip_global_norm(&mut g, 1.0);
        let got: Vec<f32> = g
            .iter()
            .map(|(_, x)| x.clone().into_scalar::<f32>())
            .collect();
        assert!(
            (got[0] - 0.6).abs() < 1e-5 && (got[1] - 0.8).abs() < 1e-5,
            "{got:?}"
        );
        // Below the limit nothing changes.
        clip_global_norm(&mut g, 10.0);
        assert!((g[1].1.clone().into_scalar::<f32>() - 0.8).abs() < 1e-6);
    }
}
