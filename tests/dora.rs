//! DoRA against PEFT: `tests/fixtures/peft_dora/` holds a DoRA adapter saved by PEFT 0.21.2 on
//! the tiny reference llama (every A, B and magnitude entry moved off its initial value) and
//! PEFT's loss and gradients on the reference's masked example (`make.py` there made them).

use crate::common;

use burn::tensor::{DType, Device, Tensor};
use common::reference_dir;
use tuna::model::llama::AttentionPath;
use tuna::model::load::load_model;
use tuna::model::lora::{
    LoraConfig, apply_lora, load_adapter, lora_parameters, merge_lora, save_peft_adapter,
};
use tuna::train::step::{StepOptions, eval_loss, loss_and_grads};

fn fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_dora")
}

fn values(t: &Tensor<2>) -> Vec<f32> {
    t.clone().inner().try_into_vec_as::<f32>().unwrap()
}

#[test]
fn dora_loss_and_gradients_match_peft() {
    let mut model = load_model(
        &reference_dir().join("tiny-llama"),
        &Device::flex(),
        DType::F32,
    )
    .unwrap();
    let cfg = load_adapter(&mut model, &fixture().join("adapter")).unwrap();
    assert!(cfg.dora && cfg.rank == 4 && cfg.scale == 2.0, "{cfg:?}");
    let expected = std::fs::read(fixture().join("expected.safetensors")).unwrap();
    let want = common::f32_tensor(&expected, "loss")[0];
    let batch = common::lora_example_batch();
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
            ((got - want) / want).abs() < 1e-5,
            "loss {got} vs PEFT's {want} (checkpoint {checkpoint})"
        );
        assert_eq!(
            sg.grads.len(),
            12,
            "A, B and magnitude of q and v in 2 layers"
        );
        for (name, g) in &sg.grads {
            let peft = match name.strip_suffix(".lora_magnitude_vector") {
                Some(p) => format!("grad.{p}.lora_magnitude_vector.default.weight"),
                None => format!("grad.{}", name.replace(".weight", ".default.weight")),
            };
            let e = common::rel_l2(&values(g), &common::f32_tensor(&expected, &peft));
            assert!(e < 1e-4, "{name} (checkpoint {checkpoint}): rel L2 {e}");
        }
    }
    // Evaluation sees the same function as training.
    let (l, _) = eval_loss(&model, &batch);
    assert!(((l.into_scalar::<f32>() - want) / want).abs() < 1e-5);
}

#[test]
fn dora_saves_in_peft_format_merges_and_starts_as_the_base() {
    let dir = reference_dir().join("tiny-llama");
    let batch = common::lora_example_batch();
    let mut model = load_model(&dir, &Device::flex(), DType::F32).unwrap();
    let base_loss = eval_loss(&model, &batch).0.into_scalar::<f32>();
    // Fresh DoRA: m = ||W||, B = 0, so the model is the base model.
    let cfg = LoraConfig {
        rank: 4,
        scale: 2.0,
        dora: true,
        ..Default::default()
    };
    apply_lora(&mut model, &cfg, 1).unwrap();
    let fresh = eval_loss(&model, &batch).0.into_scalar::<f32>();
    assert!((fresh - base_loss).abs() < 1e-5, "{fresh} vs {base_loss}");

    // PEFT's adapter round-trips through tuna's writer, and merging keeps the function.
    let mut model = load_model(&dir, &Device::flex(), DType::F32).unwrap();
    load_adapter(&mut model, &fixture().join("adapter")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    save_peft_adapter(&model, tmp.path(), None).unwrap();
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["use_dora"], true);
    let mut again = load_model(&dir, &Device::flex(), DType::F32).unwrap();
    load_adapter(&mut again, tmp.path()).unwrap();
    for ((n, x), (_, y)) in lora_parameters(&model).iter().zip(&lora_parameters(&again)) {
        assert_eq!(values(x), values(y), "{n}");
    }
    let adapted = eval_loss(&model, &batch).0.into_scalar::<f32>();
    merge_lora(&mut model);
    let merged = eval_loss(&model, &batch).0.into_scalar::<f32>();
    assert!((merged - adapted).abs() < 1e-4, "{merged} vs {adapted}");
    assert!(
        (merged - base_loss).abs() > 1e-3,
        "the adapter changes the model"
    );
}

#[test]
fn fusing_a_dora_adapter_gives_the_adapted_model() {
    let dir = reference_dir().join("tiny-llama");
    let batch = common::lora_example_batch();
    let mut model = load_model(&dir, &Device::flex(), DType::F32).unwrap();
    load_adapter(&mut model, &fixture().join("adapter")).unwrap();
    let adapted = eval_loss(&model, &batch).0.into_scalar::<f32>();
    let base = tuna::source::base::load_base(dir.to_str().unwrap()).unwrap();
    let weights = tuna::export::fuse::merged_weights(&base, &fixture().join("adapter")).unwrap();
    let fused = tuna::model::load::build_model(&base.config, &weights, &Device::flex(), DType::F32)
        .unwrap();
    let got = eval_loss(&fused, &batch).0.into_scalar::<f32>();
    assert!(
        (got - adapted).abs() < 1e-4,
        "fused {got} vs adapted {adapted}"
    );
}
