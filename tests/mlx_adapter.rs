//! mlx-lm adapters: `tests/fixtures/mlx_lora/` holds an adapter saved the way `mlx_lm.lora`
//! saves one (last layer, q_proj and v_proj, rank 4, scale 2) with mlx-lm's own loss on the
//! reference example and its 16 greedy tokens (`make.py` there made them).
//! `tests/fixtures/mlx_from_tuna/` goes the other way: an adapter trained and written by tuna,
//! loaded by mlx-lm's own `load(..., adapter_path=...)`, with the loss and greedy tokens mlx-lm
//! computed with it (`make.sh` there).

use crate::common;

use burn::tensor::{DType, Device};
use common::{Expected, reference_dir};
use safetensors::SafeTensors;
use tuna::model::load::load_model;
use tuna::model::lora::{load_adapter, save_mlx_adapter};
use tuna::train::step::eval_loss;

/// mlx-lm's masked loss and greedy tokens recorded in a fixture's `expected.safetensors`.
fn mlx_expected(dir: &std::path::Path) -> (f32, Vec<u32>) {
    let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let four = |name: &str| -> Vec<[u8; 4]> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| b.try_into().unwrap())
            .collect()
    };
    let loss = f32::from_le_bytes(four("loss")[0]);
    let tokens = four("greedy")
        .into_iter()
        .map(|b| i32::from_le_bytes(b) as u32)
        .collect();
    (loss, tokens)
}

fn fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mlx_lora")
}

#[test]
fn an_mlx_lm_adapter_gives_mlx_lm_loss_and_tokens_and_writes_back_unchanged() {
    let exp = Expected::load();
    let mut model = load_model(
        &reference_dir().join("tiny-llama"),
        &Device::flex(),
        DType::F32,
    )
    .unwrap();
    let cfg = load_adapter(&mut model, &fixture().join("adapter")).unwrap();
    assert_eq!((cfg.rank, cfg.scale, cfg.num_layers), (4, 2.0, 1));
    assert_eq!(cfg.keys, vec!["q_proj", "v_proj"]);

    let (want_loss, want_tokens) = mlx_expected(&fixture());

    let batch = common::lora_example_batch();
    let loss = eval_loss(&model, &batch).0.into_scalar::<f32>();
    assert!(
        ((loss - want_loss) / want_loss).abs() < 1e-5,
        "loss {loss} vs mlx-lm's {want_loss}"
    );
    let tokens = common::greedy16(&model, &exp.ids("tiny-llama.prompt0.ids"));
    assert_eq!(tokens, want_tokens, "greedy tokens vs mlx-lm's");

    // Written back by tuna: the same tensors and the same config mlx-lm wrote, so mlx-lm
    // generates the tokens above from tuna's adapter.
    let tmp = tempfile::tempdir().unwrap();
    save_mlx_adapter(&model, tmp.path()).unwrap();
    let ours =
        tuna::formats::safetensors::read_file(&tmp.path().join("adapters.safetensors")).unwrap();
    let theirs =
        tuna::formats::safetensors::read_file(&fixture().join("adapter/adapters.safetensors"))
            .unwrap();
    assert_eq!(ours, theirs);
    let cfg = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    assert_eq!(cfg(tmp.path()), cfg(&fixture().join("adapter")));
}

#[test]
fn adapters_mlx_lm_cannot_express_are_refused() {
    // PEFT's reference adapter covers both layers: fine. One covering only layer 0 is not
    // "the last N layers".
    let mut model = load_model(
        &reference_dir().join("tiny-llama"),
        &Device::flex(),
        DType::F32,
    )
    .unwrap();
    load_adapter(&mut model, &reference_dir().join("tiny-llama-lora")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    save_mlx_adapter(&model, tmp.path()).unwrap();
    model.layers[1].self_attn.q_proj.lora = None;
    model.layers[1].self_attn.v_proj.lora = None;
    let e = save_mlx_adapter(&model, &tmp.path().join("x")).unwrap_err();
    assert!(format!("{e:#}").contains("last N layers"), "{e:#}");
}

#[test]
fn mlx_lm_reads_a_tuna_adapter_as_tuna_does() {
    // The adapter in the fixture is what a tuna run wrote to adapter-mlx/; mlx-lm loaded it with
    // its own reader and recorded this loss and these greedy tokens.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mlx_from_tuna");
    let (want_loss, want_tokens) = mlx_expected(&dir);
    let mut model = load_model(
        &reference_dir().join("tiny-llama"),
        &Device::flex(),
        DType::F32,
    )
    .unwrap();
    let base_loss = eval_loss(&model, &common::lora_example_batch())
        .0
        .into_scalar::<f32>();
    let cfg = load_adapter(&mut model, &dir.join("adapter")).unwrap();
    // Both layers of the two-layer model (read back as "all layers"), mlx-lm's default scale.
    assert_eq!((cfg.rank, cfg.scale, cfg.num_layers), (4, 20.0, -1));
    let mut keys = cfg.keys.clone();
    keys.sort();
    assert_eq!(keys, vec!["o_proj", "q_proj", "v_proj"]);
    for layer in &model.layers {
        let a = &layer.self_attn;
        assert!(a.q_proj.lora.is_some() && a.v_proj.lora.is_some() && a.o_proj.lora.is_some());
    }
    let loss = eval_loss(&model, &common::lora_example_batch())
        .0
        .into_scalar::<f32>();
    assert!(
        ((loss - want_loss) / want_loss).abs() < 1e-5,
        "loss {loss} vs mlx-lm's {want_loss} with tuna's adapter"
    );
    // The adapter moved the model: a loader that dropped it would match the base instead.
    assert!(
        (want_loss - base_loss).abs() > 1e-2,
        "adapter loss {want_loss} too close to the base's {base_loss}"
    );
    let tokens = common::greedy16(&model, &Expected::load().ids("tiny-llama.prompt0.ids"));
    assert_eq!(
        tokens, want_tokens,
        "greedy tokens vs mlx-lm's with tuna's adapter"
    );
}
