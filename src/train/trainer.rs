//! The LoRA trainer behind `tuna train` and `tuna sweep`: data → model on a device →
//! adapters → optimizer loop with schedule, accumulation, clipping, evaluation, checkpoints
//! and resume → PEFT adapter + metrics in the run folder.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::{DType, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::checkpoint::{self, Checkpoint};
use super::settings::TrainSettings;
use super::step::{self, StepOptions};
use crate::data::dataset::{self, DataSet, Order, Split, Tokenized};
use crate::generate::answers::{self, TaskMetric};
use crate::memory::{device_mem_mb, peak_rss_mb};
use crate::model::config::ModelConfig;
use crate::model::device::{SelectedDevice, device_for};
use crate::model::llama::Llama;
use crate::model::load::build_model_quantized;
use crate::model::lora;
use crate::model::quant::QuantSpec;
use crate::optim::AdamW;
use crate::optim::{self, LossScaler};
use crate::source::base::open_base;
use crate::sweep::RunMetrics;
use crate::sweep::executor::{Interrupted, RunContext, Trainer};
use crate::sweep::metrics_log::MetricsLog;
use crate::tokenizer::Tokenizer;

/// Sequence lengths are padded to a multiple of this: fewer distinct shapes, fewer GPU
/// kernel compiles and autotune runs across the steps and runs of a sweep.
const SEQ_ROUND: usize = 32;

/// A base model built on a device, kept between the runs of a sweep: each run adapts a clone
/// (the weights are shared, not copied), and no host copy of the weights is kept.
pub struct DeviceBase {
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub model: Llama,
}

/// Trains runs, keeping the last base model of each device on that device so that a sweep
/// loads (and, for GGUF, dequantizes) it once per device, also when several workers train at
/// once on different GPUs.
#[derive(Default)]
pub struct LoraTrainer {
    /// (device, full key, model): one model per device.
    cache: Mutex<Vec<(String, String, Arc<DeviceBase>)>>,
    /// Print report lines even without a terminal (tests keep this off).
    pub quiet: bool,
}

impl LoraTrainer {
    /// The base model `spec` on the selected device, built once per (model, device, dtype).
    pub fn base(
        &self,
        spec: &str,
        sel: &SelectedDevice,
        quantize: Option<QuantSpec>,
    ) -> Result<Arc<DeviceBase>> {
        let dev = format!("{:?}", sel.device);
        let key = format!("{spec}|{dev}|{:?}|{quantize:?}", sel.dtype);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, m)) = cache.iter().find(|(_, k, _)| *k == key) {
            return Ok(m.clone());
        }
        // Drop the device's previous model before building the next one: one model per device.
        cache.retain(|(d, _, _)| *d != dev);
        let started = Instant::now();
        let b = open_base(spec).with_context(|| format!("loading model `{spec}`"))?;
        if let Some(q) = quantize {
            // Fail before any layer is converted, naming the key.
            if ![2, 4, 8].contains(&q.bits) {
                anyhow::bail!("quantize.bits is {}; use 2, 4 or 8 (or 0 for off)", q.bits);
            }
            if q.group_size % (32 / q.bits) != 0 {
                anyhow::bail!(
                    "quantize.group_size is {}; at {} bits it must be a multiple of {} (64 is mlx's default)",
                    q.group_size,
                    q.bits,
                    32 / q.bits
                );
            }
        }
        let model = build_model_quantized(
            &b.config,
            b.weights.as_ref(),
            &sel.device,
            sel.dtype,
            quantize,
        )
        .with_context(|| format!("loading model `{spec}` from {}", b.path.display()))?;
        eprintln!(
            "loaded {} in {:.1} s",
            b.path.display(),
            started.elapsed().as_secs_f64()
        );
        let m = Arc::new(DeviceBase {
            config: b.config,
            tokenizer: b.tokenizer,
            model,
        });
        cache.push((dev, key, m.clone()));
        Ok(m)
    }
}

impl Trainer for LoraTrainer {
    fn train(&self, ctx: &RunContext) -> Result<RunMetrics> {
        let s = TrainSettings::from_config(&ctx.plan.config)?;
        let sel = device_for(ctx.device.unwrap_or(&s.device), &s.dtype)?;
        let base = self.base(&s.model, &sel, s.quantize)?;
        check_against_model(&s, &base.config)?;
        let data = dataset::load(
            Path::new(&s.data),
            &base.tokenizer,
            s.max_seq_length,
            s.mask_prompt,
            base.config.vocab_size,
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
        let mut model = base.model.clone();
        lora::apply_fine_tune(&mut model, &s.lora, s.seed)?;
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

fn check_against_model(s: &TrainSettings, config: &ModelConfig) -> Result<()> {
    let n = config.num_hidden_layers as i64;
    if s.lora.num_layers > n {
        bail!(
            "lora.num_layers is {} but {} has {n} layers; use a number up to {n}, or -1 for all",
            s.lora.num_layers,
            s.model
        );
    }
    let positions = config.max_position_embeddings;
    if s.max_seq_length > positions {
        bail!(
            "train.max_seq_length is {} but {} has {positions} positions \
             (max_position_embeddings); use train.max_seq_length: {positions} or less",
            s.max_seq_length,
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

impl Run<'_> {
    /// Token-weighted mean loss over up to `max_batches` batches of a split (-1 = all).
    fn evaluate(&self, model: &Llama, split: &Split, max_batches: i64) -> Result<f64> {
        split_loss(model, split, self.s.batch_size, self.pad, max_batches)
    }

    /// AdamW with the run's settings; plain Adam is AdamW without decay.
    fn optimizer(&self) -> AdamW {
        let s = self.s;
        let decay = if s.optimizer == "adamw" {
            s.weight_decay
        } else {
            0.0
        };
        let mut opt = AdamW::new(s.schedule.learning_rate, decay);
        opt.beta1 = s.beta1;
        opt.beta2 = s.beta2;
        opt.eps = s.eps;
        opt
    }

    fn train(&self, model: &mut Llama) -> Result<RunMetrics> {
        let s = self.s;
        let dir = &self.ctx.dir.path;
        let order = Order::new(&self.data.train.examples, s.batch_size, s.seed);
        let mut opt = self.optimizer();
        let resumed = checkpoint::load(dir, model, &mut opt, self.ctx.plan.id.as_str())?;
        let start = resumed.as_ref().map_or(0, |c| c.step);
        let log = MetricsLog::open(dir, resumed.as_ref().map(|c| c.step))?;
        if let Some(c) = &resumed {
            eprintln!(
                "resuming run {} from its checkpoint at step {}",
                self.ctx.plan.id, c.step
            );
        }
        let mut st = LoopState::new(resumed.as_ref(), model.dtype);
        // Steps the sweep's early-stop rules need a validation loss at.
        let rungs = self.ctx.pruner.map(|p| p.eval_steps()).unwrap_or_default();
        let pb = progress(s.iters, start, self.quiet);
        let started = Instant::now();
        if start == 0 {
            self.validate(model, &log, &pb, &mut st, 0)?;
        }
        for step in start..s.iters {
            if self.ctx.cancel.load(Ordering::SeqCst) {
                pb.abandon();
                return Err(Interrupted.into());
            }
            let t0 = Instant::now();
            let lr = s.schedule.lr_at(step);
            opt.lr = lr;
            let loss_scale = st.scaler.as_ref().map_or(1.0, |sc| sc.scale);
            let (grads, loss, tokens) = self.micro_batches(model, &order, step, loss_scale);
            let mut grads = optim::StepGradients::new(grads, step::trainable_layout(model));
            let norm_sq = grads.norm_sq();
            let finite = match (&st.scaler, &norm_sq) {
                (Some(_), Some(n)) => Some(optim::finite(n)),
                _ => None,
            };
            if let (Some(max_norm), Some(n)) = (s.grad_clip, &norm_sq) {
                let unscaled = n.clone().div_scalar(loss_scale * loss_scale);
                grads.clip(&unscaled, max_norm);
            }
            step::apply_gradients(model, &mut opt, grads, finite.as_ref(), 1.0 / loss_scale)?;
            let done = step + 1;
            // The host learns of an overflow from the squared norm (an f32, which every backend
            // reads back alike), never from the boolean flag the device used to skip the step.
            st.window
                .push(done, loss, finite.is_some().then_some(norm_sq).flatten());
            st.trained_tokens += tokens as u64;
            st.speed_tokens += tokens;
            st.speed_time += t0.elapsed().as_secs_f64();
            pb.set_position(done);

            // Values come back to the host only here: at report steps, and in f16 every step
            // while the loss scale is unproven (at the start and after each change), so an
            // overflow there halves the scale at once, as PyTorch's GradScaler does, instead
            // of skipping every step up to the next report.
            let calibrating = st.scaler.as_ref().is_some_and(|sc| !sc.settled);
            let report = done % s.steps_per_report == 0 || done == s.iters;
            if report || calibrating {
                self.read_losses(&mut st, &mut opt, &pb, lr)?;
            }
            if report {
                let its = (done - start) as f64 / started.elapsed().as_secs_f64().max(1e-9);
                self.report(model, &log, &pb, &mut st, done, lr, its)?;
            }
            if done % s.steps_per_eval == 0 || done == s.iters || rungs.contains(&done) {
                self.validate(model, &log, &pb, &mut st, done)?;
                if st.pruned.is_some() {
                    break;
                }
            }
            let stopping = self.ctx.cancel.load(Ordering::SeqCst);
            if (done % s.save_every == 0 || stopping) && done < s.iters {
                // A checkpoint must not hold a diverged adapter: check the steps since the
                // last report first.
                self.read_losses(&mut st, &mut opt, &pb, lr)?;
                let c = Checkpoint {
                    step: done,
                    run_id: self.ctx.plan.id.clone(),
                    trained_tokens: st.trained_tokens,
                    best_val_loss: st.best_val,
                    best_val_step: st.best_step,
                    base_val_loss: st.base_val,
                    last_val_loss: st.last_val,
                    last_train_loss: st.last_train_loss,
                    seed: s.seed,
                    batches_per_epoch: order.batches_per_epoch(),
                };
                checkpoint::save(dir, model, &opt, &c)?;
                if stopping {
                    say(
                        &pb,
                        self.quiet,
                        &format!("interrupt: checkpoint saved at step {done}"),
                    );
                }
            }
        }
        pb.finish_and_clear();
        self.finish(model, &log, &pb, st)
    }

    /// One optimizer step's gradients, averaged over `grad_accumulation` micro-batches, with
    /// the target-weighted mean loss (on the device) and the tokens seen.
    fn micro_batches(
        &self,
        model: &Llama,
        order: &Order,
        step: u64,
        loss_scale: f64,
    ) -> (Vec<(String, Tensor<2>)>, Option<Tensor<1>>, usize) {
        let s = self.s;
        let mut grads: Option<Vec<(String, Tensor<2>)>> = None;
        let mut loss_sum: Option<Tensor<1>> = None;
        let (mut targets, mut tokens) = (0usize, 0usize);
        let k = 1.0 / s.grad_accumulation as f64;
        for micro in 0..s.grad_accumulation {
            let idx = order.at(step * s.grad_accumulation + micro);
            let exs: Vec<&Tokenized> = idx.iter().map(|&i| &self.data.train.examples[i]).collect();
            let b = dataset::collate(&exs, self.pad, SEQ_ROUND);
            let opts = StepOptions {
                checkpoint: s.grad_checkpoint,
                dropout_seed: Some(dropout_seed(s.seed, step, micro)),
                loss_scale,
                attention: None,
            };
            let sg = step::loss_and_grads(model, &b, &opts);
            let weighted = sg.loss.mul_scalar(sg.targets as f64);
            loss_sum = Some(match loss_sum {
                None => weighted,
                Some(l) => l + weighted,
            });
            targets += sg.targets;
            tokens += b.tokens();
            // Summed by name: a micro-batch without targets has no gradients at all.
            let acc = grads.get_or_insert_with(Vec::new);
            for (n, g) in sg.grads {
                let g = if k != 1.0 { g.mul_scalar(k) } else { g };
                match acc.iter_mut().find(|(m, _)| *m == n) {
                    Some((_, a)) => *a = a.clone() + g,
                    None => acc.push((n, g)),
                }
            }
        }
        let loss = loss_sum.map(|l| l.div_scalar(targets.max(1) as f64));
        (grads.unwrap_or_default(), loss, tokens)
    }

    /// Brings the pending losses and overflow flags to the host: logs skipped f16 steps and
    /// fails the run on a loss that is not finite.
    fn read_losses(
        &self,
        st: &mut LoopState,
        opt: &mut AdamW,
        pb: &ProgressBar,
        lr: f64,
    ) -> Result<()> {
        let read = st.window.read(st.scaler.as_mut(), opt)?;
        if let Some(loss) = read.last_loss {
            st.last_train_loss = Some(loss);
            pb.set_message(format!("loss {loss:.3}"));
        }
        for skipped in &read.skipped {
            say(
                pb,
                self.quiet,
                &format!(
                    "step {skipped}: gradients overflowed in f16; step skipped, loss scale now {}",
                    st.scaler.as_ref().map_or(1.0, |sc| sc.scale)
                ),
            );
        }
        if let Some(bad) = read.non_finite
            && read.overflow_at_floor
        {
            bail!(
                "the gradients overflowed in f16 at step {bad} even at loss scale 1 (loss {:.4}, lr {lr:.2e}); train this run in f32 (`dtype: f32`), or lower train.learning_rate",
                read.bad_value
            );
        }
        if let Some(bad) = read.non_finite {
            bail!(
                "the training loss became {} at step {bad} (lr {lr:.2e}); lower train.learning_rate or set train.grad_clip",
                read.bad_value
            );
        }
        Ok(())
    }

    /// A `train` line in the log and on the terminal.
    #[allow(clippy::too_many_arguments)]
    fn report(
        &self,
        model: &Llama,
        log: &MetricsLog,
        pb: &ProgressBar,
        st: &mut LoopState,
        done: u64,
        lr: f64,
        its: f64,
    ) -> Result<()> {
        let avg = st.window.take();
        let tps = st.speed_tokens as f64 / st.speed_time.max(1e-9);
        let trained_tokens = st.trained_tokens;
        log.log(
            "train",
            done,
            json!({"train_loss": avg, "lr": lr, "it_per_s": its, "tokens_per_s": tps,
                   "trained_tokens": trained_tokens, "peak_mem_mb": peak_rss_mb(),
                   "gpu_mem_mb": device_mem_mb(&model.device),
                   "loss_scale": st.scaler.as_ref().map(|sc| sc.scale),
                   "skipped_steps": st.scaler.as_ref().map(|sc| sc.skipped)}),
        )?;
        say(
            pb,
            self.quiet,
            &format!(
                "step {done}: train loss {avg:.4}, lr {lr:.2e}, {its:.2} it/s, {tps:.0} tok/s, {trained_tokens} tokens, peak mem {:.0} MB",
                peak_rss_mb().unwrap_or(0.0)
            ),
        );
        Ok(())
    }

    /// Validation loss at `step`, logged and folded into the best and last values.
    fn validate(
        &self,
        model: &Llama,
        log: &MetricsLog,
        pb: &ProgressBar,
        st: &mut LoopState,
        step: u64,
    ) -> Result<()> {
        let v = self.evaluate(model, &self.data.valid, self.s.val_batches)?;
        log.log("val", step, json!({"val_loss": v}))?;
        say(pb, self.quiet, &format!("step {step}: val loss {v:.4}"));
        st.last_val = Some(v);
        if step == 0 {
            // The untrained model's loss is the baseline, not a result of training.
            st.base_val = Some(v);
            return Ok(());
        }
        let improved = st.best_val.is_none_or(|b| v < b);
        if improved {
            st.best_val = Some(v);
            st.best_step = Some(step);
            // The best adapter by validation loss, kept beside the final one.
            let best = self.ctx.dir.path.join("adapter-best");
            lora::save_adapter(model, &best, Some(&self.s.model))?;
            crate::files::write_atomic(
                &best.join("step.json"),
                json!({"step": step, "val_loss": v}).to_string().as_bytes(),
            )?;
        }
        if let Some(p) = self.ctx.pruner
            && step < self.s.iters
            && let Some(why) = p.check(step, v, st.best_val.unwrap_or(v), st.base_val)
        {
            log.log("pruned", step, json!({"reason": why}))?;
            say(
                pb,
                self.quiet,
                &format!("step {step}: stopped early: {why}"),
            );
            st.pruned = Some((step, why));
        }
        Ok(())
    }

    /// After the last step: the adapter, the test evaluation, and the run's summary.
    fn finish(
        &self,
        model: &Llama,
        log: &MetricsLog,
        pb: &ProgressBar,
        st: LoopState,
    ) -> Result<RunMetrics> {
        let s = self.s;
        let dir = &self.ctx.dir.path;
        lora::save_adapter(model, &dir.join("adapter"), Some(&s.model))?;
        // The same adapters for mlx-lm users (`mlx_lm.generate --adapter-path`); a full
        // fine-tune is already in mlx-lm's form.
        if !s.lora.full {
            lora::save_mlx_adapter(model, &dir.join("adapter-mlx"))?;
        }
        let (test_loss, test_ppl) = match (&self.data.test, s.test) {
            (Some(test), true) => {
                let t = self.evaluate(model, test, s.test_batches)?;
                log.log(
                    "test",
                    st.pruned.as_ref().map_or(s.iters, |p| p.0),
                    json!({"test_loss": t, "test_ppl": t.exp()}),
                )?;
                say(
                    pb,
                    self.quiet,
                    &format!("test loss {t:.4}, perplexity {:.3}", t.exp()),
                );
                (Some(t), Some(t.exp()))
            }
            _ => (None, None),
        };
        checkpoint::remove(dir);
        Ok(RunMetrics {
            final_train_loss: st.last_train_loss,
            best_val_loss: st.best_val,
            best_val_step: st.best_step,
            base_val_loss: st.base_val,
            final_val_loss: st.last_val,
            test_loss,
            test_ppl,
            tokens_per_s: (st.speed_time > 0.0).then(|| st.speed_tokens as f64 / st.speed_time),
            peak_mem_mb: peak_rss_mb(),
            gpu_mem_mb: device_mem_mb(&model.device),
            wall_s: None,
            stopped_step: st.pruned.as_ref().map(|p| p.0),
            stop_reason: st.pruned.map(|p| p.1),
            backend: Some(self.sel.kind.to_string()),
            device: Some(device_name(&self.sel.device)),
            task_metric: None,
            task_score: None,
        })
    }
}

/// What the training loop carries from step to step; a checkpoint restores the first four.
struct LoopState {
    /// Best validation loss after step 0, and its step.
    best_val: Option<f64>,
    best_step: Option<u64>,
    /// Validation loss of the untrained model (step 0).
    base_val: Option<f64>,
    /// Set when the sweep's early-stop rules stopped the run: (step, why).
    pruned: Option<(u64, String)>,
    last_val: Option<f64>,
    trained_tokens: u64,
    last_train_loss: Option<f64>,
    speed_tokens: usize,
    speed_time: f64,
    window: Window,
    scaler: Option<LossScaler>,
}

impl LoopState {
    fn new(resumed: Option<&Checkpoint>, dtype: DType) -> Self {
        Self {
            best_val: resumed.and_then(|c| c.best_val_loss),
            best_step: resumed.and_then(|c| c.best_val_step),
            base_val: resumed.and_then(|c| c.base_val_loss),
            pruned: None,
            last_val: resumed.and_then(|c| c.last_val_loss),
            trained_tokens: resumed.map_or(0, |c| c.trained_tokens),
            last_train_loss: resumed.and_then(|c| c.last_train_loss),
            speed_tokens: 0,
            speed_time: 0.0,
            window: Window::default(),
            scaler: (dtype == DType::F16).then(LossScaler::for_f16),
        }
    }
}

/// Token-weighted mean loss over up to `max_batches` length-grouped batches of a split
/// (-1 = all), with the model as it is. The batches are spread evenly over the lengths (always
/// the same ones), so a few of them stand for the whole split, not for its shortest examples.
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
    let (mut sums, mut count) = (Vec::new(), 0usize);
    for g in spread(groups.len(), take).map(|i| &groups[i]) {
        let exs: Vec<&Tokenized> = g.iter().map(|&i| &split.examples[i]).collect();
        let b = dataset::collate(&exs, pad, SEQ_ROUND);
        let (loss, n) = step::eval_loss(model, &b);
        sums.push(loss.mul_scalar(n as f64));
        count += n;
    }
    if count == 0 {
        bail!(
            "{}: no target tokens to evaluate (are all answers cut by max_seq_length?)",
            split.path.display()
        );
    }
    // One read for the whole split.
    let total: f64 = Tensor::cat(sums, 0)
        .try_into_vec_as::<f32>()?
        .iter()
        .map(|&x| x as f64)
        .sum();
    Ok(total / count as f64)
}

/// `take` of `n` indices, evenly spaced (the middle of each of `take` equal slices).
pub fn spread(n: usize, take: usize) -> impl Iterator<Item = usize> {
    (0..take).map(move |i| ((2 * i + 1) * n) / (2 * take))
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

/// Train losses (and in f16 the squared gradient norms) of the steps since the last read, kept
/// on the device until the trainer needs them, so that a step never waits for the GPU.
#[derive(Default)]
struct Window {
    pending: Vec<(u64, Option<Tensor<1>>, Option<Tensor<1>>)>,
    sum: f64,
    n: usize,
}

/// What one read of the window found.
#[derive(Default)]
struct WindowRead {
    last_loss: Option<f64>,
    /// Steps skipped for overflowed f16 gradients.
    skipped: Vec<u64>,
    /// The first step whose loss was not finite (and not a skipped f16 overflow).
    non_finite: Option<u64>,
    bad_value: f64,
    /// The gradients overflowed f16 with the loss scale already at 1 (the loss may be finite).
    overflow_at_floor: bool,
}

impl Window {
    fn push(&mut self, step: u64, loss: Option<Tensor<1>>, norm_sq: Option<Tensor<1>>) {
        self.pending.push((step, loss, norm_sq));
    }

    /// Reads every pending step in one sync; feeds the loss scaler and takes skipped steps
    /// back from the optimizer's count.
    fn read(&mut self, mut scaler: Option<&mut LossScaler>, opt: &mut AdamW) -> Result<WindowRead> {
        let mut out = WindowRead::default();
        if self.pending.is_empty() {
            return Ok(out);
        }
        let pending = std::mem::take(&mut self.pending);
        let losses: Vec<Tensor<1>> = pending.iter().filter_map(|p| p.1.clone()).collect();
        let losses: Vec<f32> = if losses.is_empty() {
            Vec::new()
        } else {
            Tensor::cat(losses, 0).try_into_vec_as::<f32>()?
        };
        let norms: Vec<Tensor<1>> = pending.iter().filter_map(|p| p.2.clone()).collect();
        let flags: Vec<bool> = if norms.is_empty() {
            Vec::new()
        } else {
            // Finite exactly where `optim::finite` let the device apply the step.
            Tensor::cat(norms, 0)
                .try_into_vec_as::<f32>()?
                .into_iter()
                .map(|n| n < f32::MAX)
                .collect()
        };
        let (mut li, mut fi) = (0, 0);
        for (step, loss, flag) in &pending {
            let loss = loss.as_ref().map(|_| {
                li += 1;
                losses[li - 1] as f64
            });
            let ok = flag.as_ref().map_or(true, |_| {
                fi += 1;
                flags[fi - 1]
            });
            if let Some(sc) = scaler.as_deref_mut() {
                let at_floor = sc.scale <= 1.0;
                sc.update(ok);
                if !ok {
                    opt.uncount_skipped();
                    if at_floor {
                        out.non_finite = Some(*step);
                        out.bad_value = loss.unwrap_or(f64::NAN);
                        out.overflow_at_floor = true;
                        return Ok(out);
                    }
                    out.skipped.push(*step);
                    continue;
                }
            }
            if let Some(l) = loss {
                if !l.is_finite() {
                    out.non_finite = Some(*step);
                    out.bad_value = l;
                    return Ok(out);
                }
                self.sum += l;
                self.n += 1;
                out.last_loss = Some(l);
            }
        }
        Ok(out)
    }

    /// Mean of the read losses since the last call (as mlx-lm reports it).
    fn take(&mut self) -> f64 {
        let out = self.sum / self.n.max(1) as f64;
        (self.sum, self.n) = (0.0, 0);
        out
    }
}

/// The LoRA dropout seed of one micro-batch: a function of the run's seed and the step, so a
/// resumed run draws the masks an uninterrupted one would.
fn dropout_seed(seed: u64, step: u64, micro: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (step << 16) ^ micro
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
    #[test]
    fn validation_batches_spread_over_the_lengths() {
        let got: Vec<usize> = super::spread(10, 3).collect();
        assert_eq!(got, vec![1, 5, 8]);
        let all: Vec<usize> = super::spread(4, 4).collect();
        assert_eq!(all, vec![0, 1, 2, 3]);
        assert_eq!(super::spread(7, 1).collect::<Vec<_>>(), vec![3]);
    }
}
