//! LoRA parity with PEFT: loss, gradients, AdamW trajectory, merge, and adapter round trip.
//!
//! Reference data: `../shared/reference` next to the crate, or `$TUNA_REFERENCE`. Missing data
//! is a failure, never a skip.

use crate::common;

use common::{Expected, reference_dir, rel_l2};
use std::time::Instant;

use burn::module::{Lora, Module};
use burn::nn::LinearConfig;
use burn::tensor::{DType, Device, Distribution, Tensor};
use safetensors::SafeTensors;
use tuna::data::dataset::Batch;
use tuna::model::llama::{AttentionPath, Linear, Llama, LoraBranch};
use tuna::model::load::load_model;
use tuna::model::lora;
use tuna::model::lora::{load_adapter, lora_parameters, merge_lora, save_peft_adapter};
use tuna::optim::AdamW;
use tuna::train::checkpoint::{self, Checkpoint};
use tuna::train::step::{StepGrads, StepOptions, eval_loss, loss_and_grads, update_adapters};

fn read_tensors(path: &std::path::Path) -> Vec<(String, Vec<usize>, Vec<u8>, safetensors::Dtype)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                v.shape().to_vec(),
                v.data().to_vec(),
                v.dtype(),
            )
        })
        .collect()
}

struct Example {
    ids: Vec<u32>,
    mask: Vec<f32>,
}

fn example(exp: &Expected, prefix: &str) -> Example {
    let ids: Vec<u32> = exp
        .i64(&format!("{prefix}.lora.ids"))
        .iter()
        .map(|&x| x as u32)
        .collect();
    let prompt_len = exp.i64(&format!("{prefix}.lora.prompt_len"))[0] as usize;
    let mask = (0..ids.len())
        .map(|t| if t >= prompt_len { 1.0 } else { 0.0 })
        .collect();
    Example { ids, mask }
}

/// The loss evaluation computes (`tuna eval`, validation): mean NLL over the target tokens.
fn loss(model: &Llama, ex: &Example) -> Tensor<1> {
    eval_loss(model, &batch(ex)).0
}

/// The example as the trainer's one-row batch.
fn batch(ex: &Example) -> Batch {
    let n = ex.ids.len();
    Batch {
        batch: 1,
        seq: n,
        ids: ex.ids.clone(),
        attention: vec![1.0; n],
        loss_mask: ex.mask.clone(),
        lengths: vec![n],
    }
}

/// What a training step computes: loss and adapter gradients, through `train::step`.
fn step(model: &Llama, ex: &Example, opts: &StepOptions) -> StepGrads {
    loss_and_grads(model, &batch(ex), opts)
}

fn values(t: &Tensor<2>) -> Vec<f32> {
    t.clone().try_into_vec_as::<f32>().unwrap()
}

fn scalar(t: Tensor<1>) -> f32 {
    t.inner().try_into_vec_as::<f32>().unwrap()[0]
}

fn check(prefix: &str) {
    let dir = reference_dir();
    let exp = Expected::load();
    let ex = example(&exp, prefix);
    let mut model = load_model(&dir.join(prefix), &Device::flex(), DType::F32)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let cfg = load_adapter(&mut model, &dir.join(format!("{prefix}-lora")))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(cfg.rank, 4);
    assert_eq!(cfg.scale, 2.0);
    assert_eq!(cfg.keys, vec!["q_proj", "v_proj"]);

    // Loss and gradients, as a training step computes them, with and without block
    // checkpointing: both against PEFT's.
    let want = exp.f32(&format!("{prefix}.lora.loss"))[0];
    assert!(
        (scalar(loss(&model, &ex)) - want).abs() / want < 1e-4,
        "the plain forward's loss"
    );
    // The default attention path (recompute) and the explicit one, each with and without block
    // checkpointing.
    for (checkpoint, attention) in [
        (false, None),
        (true, None),
        (false, Some(AttentionPath::Explicit)),
        (true, Some(AttentionPath::Explicit)),
    ] {
        let sg = step(
            &model,
            &ex,
            &StepOptions {
                checkpoint,
                attention,
                ..Default::default()
            },
        );
        let got = scalar(sg.loss);
        let rel = ((got - want) / want).abs();
        println!(
            "{prefix} (checkpoint {checkpoint}, attention {attention:?}): loss {got} vs {want} (rel {rel:.2e})"
        );
        assert!(rel < 1e-4, "{prefix}.lora.loss: {got} vs {want}");
        assert_eq!(sg.grads.len(), 8, "one gradient per lora_A/lora_B tensor");
        for (name, g) in &sg.grads {
            let peft = name.replace(".weight", ".default.weight");
            let want = exp.f32(&format!("{prefix}.lora.grad.{peft}"));
            let e = rel_l2(&values(g), &want);
            println!("{prefix}: grad {name} rel L2 {e:.2e}");
            assert!(
                e < 1e-3,
                "{prefix} grad {name} (checkpoint {checkpoint}, attention {attention:?}): rel L2 {e}"
            );
        }
    }

    // Save / reload round trip in PEFT format, before training changes anything.
    let out = std::env::temp_dir().join(format!(
        "tuna-lora-roundtrip-{prefix}-{}",
        std::process::id()
    ));
    save_peft_adapter(&model, &out, Some("tiny")).unwrap();
    let original = read_tensors(&dir.join(format!("{prefix}-lora/adapter_model.safetensors")));
    let saved = read_tensors(&out.join("adapter_model.safetensors"));
    let mut on: Vec<&String> = original.iter().map(|t| &t.0).collect();
    let mut sn: Vec<&String> = saved.iter().map(|t| &t.0).collect();
    on.sort();
    sn.sort();
    assert_eq!(on, sn, "saved adapter keys must be PEFT's");
    for t in &saved {
        let o = original.iter().find(|x| x.0 == t.0).unwrap();
        assert_eq!((&o.1, &o.2), (&t.1, &t.2), "{} differs after save", t.0);
    }
    let mut reloaded = load_model(&dir.join(prefix), &Device::flex(), DType::F32).unwrap();
    let cfg2 = load_adapter(&mut reloaded, &out).unwrap();
    assert_eq!(
        (cfg2.rank, cfg2.scale, &cfg2.keys),
        (cfg.rank, cfg.scale, &cfg.keys)
    );
    std::fs::remove_dir_all(&out).ok();

    // AdamW trajectory.
    let want = exp.f32(&format!("{prefix}.lora.adamw_losses"));
    let mut opt = AdamW::new(1e-2, 0.0);
    let mut traj = Vec::new();
    for _ in 0..want.len() {
        let sg = step(&model, &ex, &StepOptions::default());
        traj.push(scalar(sg.loss));
        update_adapters(&mut model, &mut opt, &sg.grads, None, 1.0).unwrap();
    }
    println!("{prefix}: adamw losses {traj:?} vs {want:?}");
    for (g, w) in traj.iter().zip(&want) {
        assert!(
            (g - w).abs() < 1e-3,
            "{prefix}.lora.adamw_losses: {traj:?} vs {want:?}"
        );
    }

    // Merge (from the saved adapter, as the reference does).
    let mut merged = load_model(&dir.join(prefix), &Device::flex(), DType::F32).unwrap();
    load_adapter(&mut merged, &dir.join(format!("{prefix}-lora"))).unwrap();
    merge_lora(&mut merged);
    assert!(lora_parameters(&merged).is_empty());
    let got = scalar(loss(&merged, &ex));
    let want = exp.f32(&format!("{prefix}.lora.merged_loss"))[0];
    println!("{prefix}: merged loss {got} vs {want}");
    assert!(
        ((got - want) / want).abs() < 1e-4,
        "{prefix}.lora.merged_loss: {got} vs {want}"
    );
}

#[test]
fn tiny_llama_lora_matches_peft() {
    check("tiny-llama");
}

#[test]
fn tiny_qwen2_lora_matches_peft() {
    check("tiny-qwen2");
}

/// The side branch computes what burn's `apply_lora` computes (same output, same factor
/// gradients); prints the forward+backward time of both on CPU (best of 3).
#[test]
fn side_branch_matches_burn_apply_lora() {
    let (d, t, r, alpha) = (576, 512, 8, 16.0);
    let lin = LinearConfig::new(d, d)
        .with_bias(false)
        .init(&Device::flex().autodiff())
        .apply_lora(Lora::new(r, alpha));
    let adapter = lin.weight.adapter().expect("adapter attached");
    // burn stores weight [in, out], a [in, r], b [r, out]; tuna/PEFT use the transposes.
    let mine = Linear {
        weight: tuna::model::llama::BaseWeight::Dense(lin.weight.base().inner().transpose()),
        bias: None,
        lora: Some(LoraBranch {
            a: adapter
                .a
                .val()
                .inner()
                .transpose()
                .autodiff()
                .require_grad(),
            b: adapter
                .b
                .val()
                .inner()
                .transpose()
                .autodiff()
                .require_grad(),
            scale: alpha / r as f64,
            dropout: 0.0,
            magnitude: None,
        }),
    };
    let x = Tensor::<3>::random([1, t, d], Distribution::Normal(0.0, 1.0), &Device::flex());

    let mut best = [f64::MAX; 2];
    let mut last = None;
    for _ in 0..3 {
        let start = Instant::now();
        let y_ref = lin.forward(x.clone());
        let g_ref = y_ref.clone().sum().backward();
        let gb_ref = adapter.b.val().grad(&g_ref).expect("burn b grad");
        best[0] = best[0].min(start.elapsed().as_secs_f64());

        let start = Instant::now();
        let y = mine.forward(x.clone(), None);
        let g = y.clone().sum().backward();
        let gb = mine.lora.as_ref().unwrap().b.grad(&g).expect("b grad");
        best[1] = best[1].min(start.elapsed().as_secs_f64());
        last = Some((y, y_ref, gb, gb_ref));
    }
    let (y, y_ref, gb, gb_ref) = last.unwrap();
    let ydiff = rel_l2(
        &y.inner().try_into_vec_as::<f32>().unwrap(),
        &y_ref.inner().try_into_vec_as::<f32>().unwrap(),
    );
    let gbdiff = rel_l2(
        &gb.transpose().try_into_vec_as::<f32>().unwrap(),
        &gb_ref.try_into_vec_as::<f32>().unwrap(),
    );
    println!(
        "LoRA {d}x{d}, {t} tokens, r {r}, fwd+bwd: burn apply_lora {:.1} ms, side branch {:.1} ms",
        best[0] * 1e3,
        best[1] * 1e3
    );
    assert!(
        ydiff < 1e-5 && gbdiff < 1e-4,
        "output {ydiff}, grad B {gbdiff}"
    );
}

/// Attention cores recomputed in backward (the training default, `model::attention_op`) give
/// the explicit path's loss and gradients (every intermediate kept, burn's autodiff) across
/// layers, whichever modules carry adapters: with none on q/k/v, no gradient flows into the
/// lowest adapted layer's core; with some, it goes through it.
#[test]
fn recomputed_attention_cores_give_the_plain_gradients() {
    use tuna::model::lora::{LoraConfig, apply_lora};
    let dir = reference_dir();
    let exp = Expected::load();
    let ex = example(&exp, "tiny-llama");
    // f32 agrees to rounding; f16 (the GPU's dtype, here on the CPU) to half precision.
    for (keys, dtype, tol) in [
        (vec!["gate_proj", "down_proj"], DType::F32, 1e-4f32),
        (vec!["k_proj", "o_proj", "up_proj"], DType::F32, 1e-4),
        (vec!["q_proj", "v_proj"], DType::F16, 2e-2),
        (vec!["v_proj"], DType::F32, 1e-4),
    ] {
        let mut m = load_model(&dir.join("tiny-llama"), &Device::flex(), dtype).unwrap();
        let cfg = LoraConfig {
            rank: 4,
            scale: 2.0,
            dropout: 0.1,
            keys: keys.iter().map(|k| k.to_string()).collect(),
            num_layers: -1,
            dora: false,
            full: false,
        };
        apply_lora(&mut m, &cfg, 5).unwrap();
        // PEFT's zero B would leave every A gradient zero; random B exercises both factors.
        for layer in m.layers.iter_mut() {
            for lin in [
                &mut layer.self_attn.q_proj,
                &mut layer.self_attn.v_proj,
                &mut layer.self_attn.k_proj,
                &mut layer.self_attn.o_proj,
                &mut layer.mlp.gate_proj,
                &mut layer.mlp.up_proj,
                &mut layer.mlp.down_proj,
            ] {
                if let Some(br) = lin.lora.as_mut() {
                    br.b = br.b.random_like(Distribution::Normal(0.0, 0.5));
                }
            }
        }
        let opts = |recompute| StepOptions {
            dropout_seed: Some(7),
            attention: Some(match recompute {
                true => AttentionPath::Recompute,
                false => AttentionPath::Explicit,
            }),
            ..Default::default()
        };
        // The example, and a batch of two rows: it, and its tokens rotated by 3 with the last 4
        // positions right-padded (no target there), as the trainer's batches are.
        let one = batch(&ex);
        let n = one.seq;
        let mut two = one.clone();
        two.batch = 2;
        let mut row: Vec<u32> = ex.ids.iter().cycle().skip(3).take(n).copied().collect();
        row[n - 4..].fill(0);
        two.ids.extend(row);
        two.attention
            .extend((0..n).map(|t| if t < n - 4 { 1.0 } else { 0.0 }));
        two.loss_mask
            .extend((0..n).map(|t| if (1..n - 4).contains(&t) { 1.0 } else { 0.0 }));
        two.lengths.push(n - 4);
        for b in [one, two] {
            let plain = loss_and_grads(&m, &b, &opts(false));
            let got = loss_and_grads(&m, &b, &opts(true));
            let rows = b.batch;
            assert_eq!(
                plain.grads.len(),
                2 * keys.len() * m.layers.len(),
                "{keys:?}"
            );
            assert_eq!(got.grads.len(), plain.grads.len(), "{keys:?}");
            let (x, y) = (scalar(got.loss), scalar(plain.loss));
            assert!(
                (x - y).abs() <= tol * y.abs() / 10.0,
                "{keys:?} {dtype:?} ({rows} rows): loss {x} vs {y}"
            );
            for ((n, x), (n2, y)) in plain.grads.iter().zip(&got.grads) {
                assert_eq!(n, n2);
                let e = rel_l2(&values(y), &values(x));
                println!("{keys:?} {dtype:?} {n} ({rows} rows): rel L2 {e:.1e}");
                assert!(
                    e < tol as f64,
                    "{keys:?} {dtype:?} {n} ({rows} rows): rel L2 {e}"
                );
                assert!(
                    values(x).iter().any(|v| *v != 0.0),
                    "{n}: a zero gradient tests nothing"
                );
            }
        }
    }
}

/// Block checkpointing and loss scaling change memory and range, not gradients, also with
/// adapters on the last layer only (layers below get no backward) and LoRA dropout (the
/// recomputed layer must draw the masks the forward drew); optimizer state survives a
/// save/load.
#[test]
fn checkpointing_scaling_and_optimizer_state_round_trip() {
    use tuna::model::lora::{LoraConfig, apply_lora};
    let dir = reference_dir();
    let exp = Expected::load();
    let ex = example(&exp, "tiny-llama");
    let mut m = load_model(&dir.join("tiny-llama"), &Device::flex(), DType::F32).unwrap();
    let cfg = LoraConfig {
        rank: 4,
        scale: 2.0,
        dropout: 0.3,
        keys: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        num_layers: 1,
        dora: false,
        full: false,
    };
    apply_lora(&mut m, &cfg, 3).unwrap();
    for layer in m.layers.iter_mut() {
        for lin in [&mut layer.self_attn.q_proj, &mut layer.mlp.down_proj] {
            if let Some(br) = lin.lora.as_mut() {
                br.b = br.b.random_like(Distribution::Normal(0.0, 0.5));
            }
        }
    }
    let opts = |checkpoint, loss_scale| StepOptions {
        checkpoint,
        dropout_seed: Some(42),
        loss_scale,
        attention: None,
    };
    let plain = step(&m, &ex, &opts(false, 1.0));
    assert_eq!(plain.grads.len(), 6, "last layer only, three modules");
    let again = step(&m, &ex, &opts(false, 1.0));
    assert_eq!(
        scalar(plain.loss.clone()),
        scalar(again.loss),
        "same dropout seed, same masks"
    );
    let other = step(
        &m,
        &ex,
        &StepOptions {
            dropout_seed: Some(43),
            ..opts(false, 1.0)
        },
    );
    assert_ne!(
        scalar(plain.loss.clone()),
        scalar(other.loss),
        "another seed draws other masks"
    );
    let explicit = StepOptions {
        attention: Some(AttentionPath::Explicit),
        ..opts(false, 1.0)
    };
    for (variant, scale) in [
        (opts(true, 1.0), 1.0),
        (opts(false, 1024.0), 1024.0),
        (explicit, 1.0),
    ] {
        let got = step(&m, &ex, &variant);
        assert_eq!(got.grads.len(), plain.grads.len());
        // Same math in another order (checkpointing recomputes; f32 sums may regroup
        // across threads): equal to f32 rounding, relative.
        let (a, b) = (scalar(got.loss), scalar(plain.loss.clone()));
        assert!(
            (a - b).abs() <= 1e-6 * b.abs().max(1.0),
            "loss {a} vs {b} (checkpoint {}, scale {scale})",
            variant.checkpoint
        );
        for ((n, x), (_, y)) in plain.grads.iter().zip(&got.grads) {
            let y: Vec<f32> = values(y).iter().map(|v| v / scale as f32).collect();
            let e = rel_l2(&y, &values(x));
            assert!(
                e < 1e-5,
                "{n} (checkpoint {}, scale {scale}): {e}",
                variant.checkpoint
            );
        }
    }

    let mut opt = AdamW::new(1e-2, 0.1);
    update_adapters(&mut m, &mut opt, &plain.grads, None, 1.0).unwrap();
    // Through the run folder's checkpoint, as a resumed run reads it: adapters and moments.
    let run_dir = tempfile::tempdir().unwrap();
    let state = Checkpoint {
        step: 1,
        run_id: "r".into(),
        batches_per_epoch: 1,
        ..Default::default()
    };
    checkpoint::save(run_dir.path(), &m, &opt, &state).unwrap();
    let mut m2 = m.clone();
    lora::apply_lora(&mut m2, &lora::LoraConfig::default(), 99).unwrap();
    let mut opt2 = AdamW::new(1e-2, 0.1);
    let back = checkpoint::load(run_dir.path(), &mut m2, &mut opt2, "r").unwrap();
    assert_eq!(back, Some(state));
    assert_eq!(opt2.steps_taken(), 1);
    assert!(
        checkpoint::load(run_dir.path(), &mut m2, &mut opt2, "other").is_err(),
        "another run's checkpoint is refused"
    );
    let g = step(&m, &ex, &opts(false, 1.0)).grads;
    update_adapters(&mut m, &mut opt, &g, None, 1.0).unwrap();
    update_adapters(&mut m2, &mut opt2, &g, None, 1.0).unwrap();
    for ((n, x), (_, y)) in lora_parameters(&m).iter().zip(&lora_parameters(&m2)) {
        assert_eq!(values(x), values(y), "{n} after restored optimizer step");
    }
}

/// A step whose gradients are not finite leaves adapters and moments as they were.
#[test]
fn skipped_step_keeps_the_adapters() {
    let dir = reference_dir();
    let exp = Expected::load();
    let ex = example(&exp, "tiny-llama");
    let mut m = load_model(&dir.join("tiny-llama"), &Device::flex(), DType::F32).unwrap();
    load_adapter(&mut m, &dir.join("tiny-llama-lora")).unwrap();
    let before: Vec<Vec<f32>> = lora_parameters(&m).iter().map(|(_, t)| values(t)).collect();
    let mut grads = step(&m, &ex, &StepOptions::default()).grads;
    grads[0].1 = grads[0].1.clone().mul_scalar(f32::INFINITY);
    let norm = tuna::optim::global_norm_sq(&grads).unwrap();
    let ok = tuna::optim::finite(&norm);
    let mut opt = AdamW::new(1e-2, 0.0);
    update_adapters(&mut m, &mut opt, &grads, Some(&ok), 1.0).unwrap();
    let after: Vec<Vec<f32>> = lora_parameters(&m).iter().map(|(_, t)| values(t)).collect();
    assert_eq!(
        before, after,
        "an overflowed step must not move the adapters"
    );
    // The next finite step moves them.
    let good = step(&m, &ex, &StepOptions::default()).grads;
    let ok = tuna::optim::finite(&tuna::optim::global_norm_sq(&good).unwrap());
    update_adapters(&mut m, &mut opt, &good, Some(&ok), 1.0).unwrap();
    let moved: Vec<Vec<f32>> = lora_parameters(&m).iter().map(|(_, t)| values(t)).collect();
    assert_ne!(before, moved);
}

/// LoRA dropout acts only in a training step (seeded), on the adapter input; evaluation and
/// a step without a dropout seed see none.
#[test]
fn lora_dropout_only_in_training() {
    use tuna::model::lora::{LoraConfig, apply_lora};
    let dir = reference_dir();
    let exp = Expected::load();
    let ex = example(&exp, "tiny-llama");
    let mut m = load_model(&dir.join("tiny-llama"), &Device::flex(), DType::F32).unwrap();
    apply_lora(
        &mut m,
        &LoraConfig {
            rank: 4,
            scale: 2.0,
            dropout: 0.5,
            keys: vec!["q_proj".into(), "down_proj".into()],
            num_layers: 1,
            dora: false,
            full: false,
        },
        1,
    )
    .unwrap();
    assert_eq!(lora_parameters(&m).len(), 4, "last layer only, two modules");
    // B = 0 at init; give it values so the branch matters.
    for layer in m.layers.iter_mut() {
        for lin in [&mut layer.self_attn.q_proj, &mut layer.mlp.down_proj] {
            if let Some(br) = lin.lora.as_mut() {
                br.b = br.b.random_like(Distribution::Normal(0.0, 0.5));
            }
        }
    }
    let eval1 = scalar(loss(&m, &ex));
    let eval2 = scalar(loss(&m, &ex));
    assert_eq!(eval1, eval2);
    let train = scalar(
        step(
            &m,
            &ex,
            &StepOptions {
                dropout_seed: Some(7),
                ..Default::default()
            },
        )
        .loss,
    );
    assert_ne!(train, eval1, "dropout must change the training forward");
    let plain = scalar(step(&m, &ex, &StepOptions::default()).loss);
    assert!((plain - eval1).abs() < 1e-5, "{plain} vs {eval1}");
}
