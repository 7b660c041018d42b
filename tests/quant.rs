//! Quantized base weights against mlx: `tests/fixtures/mlx_quant/quant.safetensors` holds a
//! weight, mlx's `quantize` of it at 4 and 8 bits (group size 64) and mlx's `dequantize` of
//! those (made by `tests/fixtures/mlx_quant/make.py` with mlx on CPU).

use crate::common;

use burn::tensor::{DType, Device, Tensor, TensorData};
use common::max_abs;
use safetensors::SafeTensors;
use tuna::model::quant::{QuantSpec, QuantWeight, quantize};

struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    fn load() -> Self {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/mlx_quant/quant.safetensors"
        );
        Self {
            bytes: std::fs::read(p).unwrap(),
        }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }
    fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let st = self.st();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        let v = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        (v, t.shape().to_vec())
    }
    fn u32(&self, name: &str) -> Vec<u32> {
        let st = self.st();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::U32, "{name}");
        t.data()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
}

fn values(t: Tensor<2>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().unwrap()
}

#[test]
fn mlx_packed_weights_dequantize_to_mlx_values() {
    let fx = Fixture::load();
    let dev = Device::flex();
    for bits in [4, 8] {
        let spec = QuantSpec {
            bits,
            group_size: 64,
        };
        let (scales, gshape) = fx.f32(&format!("q{bits}.scales"));
        let (biases, _) = fx.f32(&format!("q{bits}.biases"));
        let (want, shape) = fx.f32(&format!("q{bits}.dequant"));
        let q = QuantWeight::new(
            &fx.u32(&format!("q{bits}.weight")),
            TensorData::new(scales, gshape.clone()),
            TensorData::new(biases, gshape),
            [shape[0], shape[1]],
            spec,
            &dev,
        )
        .unwrap();
        let got = values(q.dequantize(DType::F32));
        let d = max_abs(&got, &want);
        assert!(
            d < 1e-6,
            "{bits} bits: max abs diff {d} from mlx's dequantize"
        );
        // In f16 (the GPU's compute type) scale and bias are held and applied in f16, as mlx
        // does: each value is within a few f16 roundings (2^-11 relative) of the largest.
        let half = values(
            q.scales_as(DType::F16)
                .dequantize(DType::F16)
                .cast(DType::F32),
        );
        let top = want.iter().fold(0f32, |m, w| m.max(w.abs()));
        let worst = max_abs(&half, &want) / top;
        assert!(
            worst < 2e-3,
            "{bits} bits in f16: worst error {worst} of the largest value"
        );
    }
}

#[test]
fn quantizing_like_mlx_gives_mlx_codes_and_values() {
    let fx = Fixture::load();
    let (w, shape) = fx.f32("w");
    let shape = [shape[0], shape[1]];
    for bits in [4, 8] {
        let spec = QuantSpec {
            bits,
            group_size: 64,
        };
        let (words, scales, biases) = quantize(&w, shape, spec);
        let (want_scales, _) = fx.f32(&format!("q{bits}.scales"));
        let (want_biases, _) = fx.f32(&format!("q{bits}.biases"));
        let ds = max_abs(&scales, &want_scales);
        let db = max_abs(&biases, &want_biases);
        assert!(
            ds < 1e-6 && db < 1e-6,
            "{bits} bits: scales {ds}, biases {db}"
        );
        let want_words = fx.u32(&format!("q{bits}.weight"));
        let same = words
            .iter()
            .zip(&want_words)
            .filter(|(a, b)| a == b)
            .count();
        assert!(
            same as f64 >= 0.99 * words.len() as f64,
            "{bits} bits: {same}/{} packed words equal mlx's (rounding ties may differ)",
            words.len()
        );
        // As close to the original as mlx's own quantization, and within a step of it.
        let q = QuantWeight::from_dense(&w, shape, spec, &Device::flex()).unwrap();
        let deq = values(q.dequantize(DType::F32));
        let (mlx_deq, _) = fx.f32(&format!("q{bits}.dequant"));
        let step = scales.iter().fold(0.0f32, |m, s| m.max(s.abs()));
        assert!(max_abs(&deq, &w) <= max_abs(&mlx_deq, &w) + 1e-6);
        assert!(max_abs(&deq, &mlx_deq) <= step + 1e-6);
    }
}

#[test]
fn bad_quantization_specs_are_errors() {
    let dev = Device::flex();
    let w = vec![0.0f32; 4 * 96];
    let e = QuantWeight::from_dense(
        &w,
        [4, 96],
        QuantSpec {
            bits: 4,
            group_size: 64,
        },
        &dev,
    )
    .unwrap_err();
    assert!(format!("{e}").contains("96 inputs"), "{e}");
    let e = QuantWeight::from_dense(
        &w,
        [4, 96],
        QuantSpec {
            bits: 3,
            group_size: 32,
        },
        &dev,
    )
    .unwrap_err();
    assert!(format!("{e}").contains("3-bit"), "{e}");
}

/// A 4-bit checkpoint written by `mlx_lm.convert` (the tiny reference llama: q/k/v/o/gate/up,
/// embedding and lm_head quantized, down_proj dense) loads without dequantizing its linear
/// layers, and its logits equal mlx-lm's own forward
/// (`tests/fixtures/mlx_q4_tiny/make.py`).
#[test]
fn mlx_lm_4bit_checkpoint_gives_mlx_lm_logits() {
    use tuna::model::llama::BaseWeight;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mlx_q4_tiny");
    let model = tuna::model::load::load_model(&dir, &Device::flex(), DType::F32).unwrap();
    let quantized = |w: &BaseWeight| matches!(w, BaseWeight::Quant(_));
    let l0 = &model.layers[0];
    assert!(quantized(&l0.self_attn.q_proj.weight) && quantized(&l0.mlp.up_proj.weight));
    assert!(
        !quantized(&l0.mlp.down_proj.weight),
        "88 inputs: mlx-lm left it dense"
    );
    let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<u32> = st
        .tensor("ids")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect();
    let want: Vec<f32> = st
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let got = model
        .forward(model.ids_tensor(&ids, 1), None)
        .try_into_vec_as::<f32>()
        .unwrap();
    let d = max_abs(&got, &want);
    println!("max abs logit diff vs mlx-lm: {d:.2e}");
    assert!(d < 1e-4, "logits differ from mlx-lm's by {d}");
}

/// QLoRA is LoRA on the dequantized base: a model quantized at load gives the same loss and
/// adapter gradients as a dense model holding the dequantized weights, and training it lowers
/// the loss.
#[test]
fn qlora_step_equals_lora_on_the_dequantized_base_and_learns() {
    use tuna::data::dataset::Batch;
    use tuna::formats::safetensors::map_dir;
    use tuna::model::config::ModelConfig;
    use tuna::model::llama::BaseWeight;
    use tuna::model::load::build_model_quantized;
    use tuna::model::lora::{LoraConfig, apply_lora};
    use tuna::optim::AdamW;
    use tuna::train::step::{StepOptions, loss_and_grads, update_adapters};

    let dir = common::reference_dir().join("tiny-llama");
    let config = ModelConfig::from_file(dir.join("config.json")).unwrap();
    let spec = QuantSpec {
        bits: 4,
        group_size: 32,
    };
    let dev = Device::flex();
    let mut q = build_model_quantized(
        &config,
        &map_dir(&dir).unwrap(),
        &dev,
        DType::F32,
        Some(spec),
    )
    .unwrap();
    // The dense twin: every quantized weight replaced by its dequantized values.
    let mut dense = q.clone();
    let mut n_quant = 0;
    for layer in dense.layers.iter_mut() {
        for lin in [
            &mut layer.self_attn.q_proj,
            &mut layer.self_attn.k_proj,
            &mut layer.self_attn.v_proj,
            &mut layer.self_attn.o_proj,
            &mut layer.mlp.gate_proj,
            &mut layer.mlp.up_proj,
            &mut layer.mlp.down_proj,
        ] {
            if let BaseWeight::Quant(w) = &lin.weight {
                lin.weight = BaseWeight::Dense(w.dequantize(DType::F32));
                n_quant += 1;
            }
        }
    }
    assert_eq!(
        n_quant, 12,
        "q/k/v/o/gate/up of both layers; down_proj (88 inputs) stays dense"
    );
    let lcfg = LoraConfig {
        rank: 4,
        scale: 2.0,
        dropout: 0.0,
        keys: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        num_layers: -1,
        dora: false,
        full: false,
    };
    apply_lora(&mut q, &lcfg, 3).unwrap();
    apply_lora(&mut dense, &lcfg, 3).unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 1000).collect();
    let batch = Batch {
        batch: 1,
        seq: ids.len(),
        attention: vec![1.0; ids.len()],
        loss_mask: vec![1.0; ids.len()],
        lengths: vec![ids.len()],
        ids,
    };
    let a = loss_and_grads(&q, &batch, &StepOptions::default());
    let b = loss_and_grads(&dense, &batch, &StepOptions::default());
    let (la, lb) = (
        a.loss.clone().into_scalar::<f32>(),
        b.loss.clone().into_scalar::<f32>(),
    );
    assert!((la - lb).abs() < 1e-5, "loss {la} vs {lb}");
    for ((n, x), (_, y)) in a.grads.iter().zip(&b.grads) {
        let d = max_abs(&values(x.clone()), &values(y.clone()));
        assert!(d < 1e-5, "{n}: gradients differ by {d}");
    }
    let mut opt = AdamW::new(1e-2, 0.0);
    let first = la;
    let mut last = la;
    for _ in 0..10 {
        let sg = loss_and_grads(&q, &batch, &StepOptions::default());
        last = sg.loss.clone().into_scalar::<f32>();
        update_adapters(&mut q, &mut opt, &sg.grads, None, 1.0).unwrap();
    }
    assert!(last < first - 0.1, "QLoRA must learn: {first} -> {last}");
    // The base stays quantized through training.
    assert!(matches!(
        q.layers[0].self_attn.q_proj.weight,
        BaseWeight::Quant(_)
    ));
}
