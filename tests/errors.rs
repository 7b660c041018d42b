//! User input that used to panic now fails with a message naming the file and what is wrong:
//! adapters and checkpoints of the wrong shape, token ids outside the model's vocabulary, and
//! a tokenizer that cannot decode during generation.

use crate::common;

use std::path::Path;

use burn::tensor::{DType, Device};
use common::reference_dir;
use tuna::formats::safetensors;
use tuna::model::load::load_model;
use tuna::model::lora::{LoraConfig, apply_lora};
use tuna::optim::AdamW;
use tuna::train::checkpoint;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The tiny reference model with fresh default adapters.
fn adapted_model() -> tuna::model::llama::Llama {
    let mut m = load_model(
        &reference_dir().join("tiny-llama"),
        &Device::flex(),
        DType::F32,
    )
    .unwrap();
    apply_lora(&mut m, &LoraConfig::default(), 0).unwrap();
    m
}

/// The reference adapter with one factor flattened to 1-D.
fn adapter_with_a_1d_factor(dir: &Path) {
    copy_dir(&reference_dir().join("tiny-llama-lora"), dir);
    let file = dir.join("adapter_model.safetensors");
    let mut t = safetensors::read_file(&file).unwrap();
    let (name, first) = t.iter_mut().next().unwrap();
    let name = name.clone();
    first.shape = vec![first.data.len()];
    safetensors::write_f32(&t, &[], &file).unwrap();
    assert!(t[&name].shape.len() == 1);
}

#[test]
fn fuse_rejects_a_factor_that_is_not_2d() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    adapter_with_a_1d_factor(&adapter);
    let base = tuna::source::base::load_base(reference_dir().join("tiny-llama").to_str().unwrap())
        .unwrap();
    let e = tuna::export::fuse::merged_weights(&base, &adapter).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("adapter_model.safetensors") && msg.contains("2-D"),
        "{msg}"
    );
    // And so does loading it onto a model.
    let mut m = load_model(
        &reference_dir().join("tiny-llama"),
        &Device::flex(),
        DType::F32,
    )
    .unwrap();
    let e = tuna::model::lora::load_adapter(&mut m, &adapter).unwrap_err();
    assert!(format!("{e:#}").contains("2-D"), "{e:#}");
}

#[test]
fn a_checkpoint_with_malformed_optimizer_state_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = adapted_model();
    let state = checkpoint::Checkpoint {
        step: 3,
        run_id: "r".into(),
        batches_per_epoch: 1,
        ..Default::default()
    };
    let mut opt = AdamW::new(1e-3, 0.0);
    let grads = tuna::model::lora::lora_parameters(&m);
    tuna::train::step::update_adapters(&mut m, &mut opt, &grads, None, 1.0).unwrap();
    checkpoint::save(tmp.path(), &m, &opt, &state).unwrap();
    let file = tmp.path().join("checkpoint/optimizer.safetensors");
    let (mut t, meta) = safetensors::read_file_with_metadata(&file).unwrap();
    let first = t.values_mut().next().unwrap();
    first.shape = vec![first.data.len()];
    let step = meta["adam_step"].clone();
    safetensors::write_f32(&t, &[("adam_step", step)], &file).unwrap();
    let e = checkpoint::load(tmp.path(), &mut m, &mut AdamW::new(1e-3, 0.0), "r").unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("optimizer.safetensors") && msg.contains("2-D"),
        "{msg}"
    );
    assert!(
        !tmp.path().join("checkpoint.tmp").exists(),
        "no half-written checkpoint left"
    );

    // A moment of the right size in the wrong shape (transposed) is named too, not reshaped.
    checkpoint::save(tmp.path(), &m, &opt, &state).unwrap();
    let (mut t, meta) = safetensors::read_file_with_metadata(&file).unwrap();
    let (name, first) = t.iter_mut().next().unwrap();
    let name = name.clone();
    first.shape = vec![first.shape[1], first.shape[0]];
    let step = meta["adam_step"].clone();
    safetensors::write_f32(&t, &[("adam_step", step)], &file).unwrap();
    let e = checkpoint::load(tmp.path(), &mut m, &mut AdamW::new(1e-3, 0.0), "r").unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains(&name) && msg.contains("has shape"), "{msg}");
}

#[test]
fn token_ids_beyond_the_model_vocabulary_name_the_example() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let line = r#"{"prompt": "Fever and cough", "completion": "Influenza"}"#;
    for split in ["train", "valid"] {
        std::fs::write(
            data.join(format!("{split}.jsonl")),
            format!("{line}\n{line}\n"),
        )
        .unwrap();
    }
    let base = tuna::source::base::load_base(reference_dir().join("tiny-llama").to_str().unwrap())
        .unwrap();
    let vocab = base.config.vocab_size;
    assert!(tuna::data::dataset::load(data, &base.tokenizer, 64, false, vocab).is_ok());
    // A model whose vocabulary is smaller than what the tokenizer produces.
    let e = tuna::data::dataset::load(data, &base.tokenizer, 64, false, 3).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("train.jsonl: example 1") && msg.contains("vocabulary of 3"),
        "{msg}"
    );
}

#[test]
fn a_decoder_error_during_generation_is_returned() {
    let m = load_model(
        &reference_dir().join("tiny-llama"),
        &Device::flex(),
        DType::F32,
    )
    .unwrap();
    let cfg = tuna::generate::GenerateConfig {
        max_new_tokens: 3,
        ..Default::default()
    };
    let decode = |_: &[u32]| -> anyhow::Result<String> { anyhow::bail!("cannot decode ids") };
    let e =
        tuna::generate::generate(&m, &[1, 2, 3], &cfg, Some(&decode), &mut |_| true).unwrap_err();
    assert!(format!("{e:#}").contains("cannot decode"), "{e:#}");
}

#[test]
fn adapter_names_that_the_model_lacks_are_refused() {
    let mut m = adapted_model();
    let mut params = tuna::model::lora::lora_parameters(&m);
    params[0].0 = "base_model.model.model.layers.99.self_attn.q_proj.lora_A.weight".into();
    let e = tuna::model::lora::set_lora_parameters(&mut m, params).unwrap_err();
    assert!(format!("{e:#}").contains("layers.99"), "{e:#}");
}
