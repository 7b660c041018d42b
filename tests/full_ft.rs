//! Full fine-tuning against PyTorch: `tests/fixtures/full_ft/` holds the loss, the gradient of
//! every weight of the last block, and the losses after three AdamW steps that PyTorch computed
//! on the reference's masked examples (`make.py` there made them), for tiny-llama and for
//! tiny-qwen2 (biases, tied embeddings).

use crate::common;

use burn::tensor::{DType, Device};
use common::{example_batch, reference_dir};
use safetensors::SafeTensors;
use tuna::model::llama::AttentionPath;
use tuna::model::load::load_model;
use tuna::model::lora::{self, LoraConfig, load_adapter, save_adapter, trainable_parameters};
use tuna::optim::AdamW;
use tuna::train::step::{StepOptions, eval_loss, loss_and_grads, update_adapters};

fn expected() -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/full_ft/expected.safetensors"),
    )
    .unwrap()
}

fn full_last_block() -> LoraConfig {
    LoraConfig {
        full: true,
        num_layers: 1,
        ..Default::default()
    }
}

#[test]
fn full_fine_tuning_matches_pytorch() {
    let want = expected();
    for name in ["tiny-llama", "tiny-qwen2"] {
        let dir = reference_dir().join(name);
        let mut model = load_model(&dir, &Device::flex(), DType::F32).unwrap();
        lora::apply_fine_tune(&mut model, &full_last_block(), 0).unwrap();
        let batch = example_batch(name);
        let loss0 = common::f32_tensor(&want, &format!("{name}.loss0"))[0];
        for (checkpoint, attention) in [
            (false, None),
            (true, None),
            (false, Some(AttentionPath::Explicit)),
            (true, Some(AttentionPath::Explicit)),
        ] {
            let sg = loss_and_grads(
                &model,
                &batch,
                &StepOptions {
                    checkpoint,
                    attention,
                    ..Default::default()
                },
            );
            let got = sg.loss.into_scalar::<f32>();
            assert!(
                ((got - loss0) / loss0).abs() < 1e-5,
                "{name}: loss {got} vs {loss0}"
            );
            let torch_count = SafeTensors::deserialize(&want)
                .unwrap()
                .names()
                .iter()
                .filter(|n| n.starts_with(&format!("{name}.grad.")))
                .count();
            assert_eq!(
                sg.grads.len(),
                torch_count,
                "{name}: one gradient per tensor of the block"
            );
            for (n, g) in &sg.grads {
                let g = g.clone().inner().try_into_vec_as::<f32>().unwrap();
                let e = common::rel_l2(&g, &common::f32_tensor(&want, &format!("{name}.grad.{n}")));
                assert!(e < 1e-4, "{name} {n} (checkpoint {checkpoint}): rel L2 {e}");
            }
        }
        // Three AdamW steps as torch.optim.AdamW takes them.
        let mut opt = AdamW::new(1e-3, 0.01);
        let losses = common::f32_tensor(&want, &format!("{name}.losses"));
        for (k, want_loss) in losses.iter().enumerate() {
            let sg = loss_and_grads(&model, &batch, &StepOptions::default());
            update_adapters(&mut model, &mut opt, &sg.grads, None, 1.0).unwrap();
            let got = eval_loss(&model, &batch).0.into_scalar::<f32>();
            assert!(
                ((got - want_loss) / want_loss).abs() < 1e-5,
                "{name}: loss after step {} {got} vs PyTorch's {want_loss}",
                k + 1
            );
        }
        // Saved as mlx-lm saves a full fine-tune, and loaded back onto a fresh base.
        let tmp = tempfile::tempdir().unwrap();
        save_adapter(&model, tmp.path(), None).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["fine_tune_type"], "full");
        assert_eq!(cfg["num_layers"], 1);
        let mut again = load_model(&dir, &Device::flex(), DType::F32).unwrap();
        let loaded = load_adapter(&mut again, tmp.path()).unwrap();
        assert!(loaded.full && loaded.num_layers == 1, "{loaded:?}");
        let a = eval_loss(&model, &batch).0.into_scalar::<f32>();
        let b = eval_loss(&again, &batch).0.into_scalar::<f32>();
        assert_eq!(
            a, b,
            "{name}: the reloaded fine-tune computes the same loss"
        );
        assert_eq!(
            trainable_parameters(&again).len(),
            trainable_parameters(&model).len()
        );
    }
}

#[test]
fn full_fine_tuning_refuses_a_quantized_base() {
    let dir = reference_dir().join("tiny-llama");
    let mut model = tuna::model::load::build_model_quantized(
        &tuna::model::config::ModelConfig::from_file(dir.join("config.json")).unwrap(),
        &tuna::formats::safetensors::map_dir(&dir).unwrap(),
        &Device::flex(),
        DType::F32,
        Some(tuna::model::quant::QuantSpec {
            bits: 4,
            group_size: 32,
        }),
    )
    .unwrap();
    let e = lora::apply_fine_tune(&mut model, &full_last_block(), 0).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("fine_tune_type") && msg.contains("quantized"),
        "{msg}"
    );
}

#[test]
fn a_full_fine_tune_checkpoint_resumes_exactly() {
    let dir = reference_dir().join("tiny-llama");
    let batch = example_batch("tiny-llama");
    let fresh = || {
        let mut m = load_model(&dir, &Device::flex(), DType::F32).unwrap();
        lora::apply_fine_tune(&mut m, &full_last_block(), 0).unwrap();
        m
    };
    let step = |m: &mut tuna::model::llama::Llama, opt: &mut AdamW| {
        let sg = loss_and_grads(m, &batch, &StepOptions::default());
        update_adapters(m, opt, &sg.grads, None, 1.0).unwrap();
    };
    let (mut a, mut opt_a) = (fresh(), AdamW::new(1e-3, 0.01));
    step(&mut a, &mut opt_a);
    let run = tempfile::tempdir().unwrap();
    let c = tuna::train::checkpoint::Checkpoint {
        step: 1,
        run_id: "r".into(),
        batches_per_epoch: 1,
        ..Default::default()
    };
    tuna::train::checkpoint::save(run.path(), &a, &opt_a, &c).unwrap();
    let (mut b, mut opt_b) = (fresh(), AdamW::new(1e-3, 0.01));
    let got = tuna::train::checkpoint::load(run.path(), &mut b, &mut opt_b, "r").unwrap();
    assert_eq!(got.map(|c| c.step), Some(1));
    step(&mut a, &mut opt_a);
    step(&mut b, &mut opt_b);
    let la = eval_loss(&a, &batch).0.into_scalar::<f32>();
    let lb = eval_loss(&b, &batch).0.into_scalar::<f32>();
    assert_eq!(la, lb, "the resumed run takes the same second step");
}
