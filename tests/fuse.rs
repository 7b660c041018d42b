//! `tuna fuse` writes the base's float type, and a quantized base only with `--dequantize`.

use crate::common;

use std::path::Path;

use burn::tensor::{DType, Device};
use common::reference_dir;
use tuna::export::fuse::{FuseOptions, fuse};
use tuna::formats::safetensors::{FloatType, read_dir, write_as};
use tuna::model::load::{build_model, load_model};
use tuna::model::lora::load_adapter;
use tuna::source::base::load_base;
use tuna::train::step::eval_loss;

/// A model folder from `model_dir` (config and weights) with the reference tokenizer files.
fn folder_with_tokenizer(model_dir: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        std::fs::copy(reference_dir().join("tiny-llama").join(f), to.join(f)).unwrap();
    }
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model_dir.join(f), to.join(f)).unwrap();
    }
}

fn loss_of(dir: &Path) -> f32 {
    let m = load_model(dir, &Device::flex(), DType::F32).unwrap();
    eval_loss(&m, &common::lora_example_batch())
        .0
        .into_scalar::<f32>()
}

fn stored_dtype(dir: &Path) -> safetensors::Dtype {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("model.norm.weight").unwrap().dtype()
}

#[test]
fn an_f16_base_fuses_to_f16() {
    let tmp = tempfile::tempdir().unwrap();
    let src = reference_dir().join("tiny-llama");
    let base_dir = tmp.path().join("base16");
    folder_with_tokenizer(&src, &base_dir);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["dtype"] = "float16".into();
    std::fs::write(base_dir.join("config.json"), config.to_string()).unwrap();
    write_as(
        &read_dir(&src).unwrap(),
        FloatType::F16,
        &base_dir.join("model.safetensors"),
    )
    .unwrap();

    let base = load_base(base_dir.to_str().unwrap()).unwrap();
    let adapter = reference_dir().join("tiny-llama-lora");
    let out = tmp.path().join("fused");
    let ty = fuse(&base, &adapter, &out, FuseOptions::default()).unwrap();
    assert_eq!(ty, FloatType::F16);
    assert_eq!(stored_dtype(&out), safetensors::Dtype::F16);
    // Same function as the adapted base, to f16 precision.
    let mut adapted = load_model(&base_dir, &Device::flex(), DType::F32).unwrap();
    load_adapter(&mut adapted, &adapter).unwrap();
    let want = eval_loss(&adapted, &common::lora_example_batch())
        .0
        .into_scalar::<f32>();
    let got = loss_of(&out);
    assert!((got - want).abs() < 1e-2, "{got} vs {want}");
    // f32 only when asked.
    let out32 = tmp.path().join("fused32");
    let opts = FuseOptions {
        dtype: Some(FloatType::F32),
        dequantize: false,
        ..Default::default()
    };
    fuse(&base, &adapter, &out32, opts).unwrap();
    assert_eq!(stored_dtype(&out32), safetensors::Dtype::F32);
}

#[test]
fn a_quantized_base_fuses_only_with_dequantize() {
    let tmp = tempfile::tempdir().unwrap();
    let q4 = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mlx_q4_tiny");
    let base_dir = tmp.path().join("q4");
    folder_with_tokenizer(&q4, &base_dir);
    let base = load_base(base_dir.to_str().unwrap()).unwrap();
    let adapter = reference_dir().join("tiny-llama-lora");
    let e = fuse(
        &base,
        &adapter,
        &tmp.path().join("no"),
        FuseOptions::default(),
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("--dequantize"), "{e:#}");

    let out = tmp.path().join("fused");
    let opts = FuseOptions {
        dtype: None,
        dequantize: true,
        ..Default::default()
    };
    assert_eq!(fuse(&base, &adapter, &out, opts).unwrap(), FloatType::F16);
    assert_eq!(stored_dtype(&out), safetensors::Dtype::F16);
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(!config.contains("quantization"), "{config}");
    // The dense fused model computes what the quantized base with the adapter computes.
    let mut adapted = load_model(&base_dir, &Device::flex(), DType::F32).unwrap();
    load_adapter(&mut adapted, &adapter).unwrap();
    let want = eval_loss(&adapted, &common::lora_example_batch())
        .0
        .into_scalar::<f32>();
    let fused = load_base(out.to_str().unwrap()).unwrap();
    let m = build_model(&fused.config, &fused.weights, &Device::flex(), DType::F32).unwrap();
    let got = eval_loss(&m, &common::lora_example_batch())
        .0
        .into_scalar::<f32>();
    assert!((got - want).abs() < 1e-2, "{got} vs {want}");
}
