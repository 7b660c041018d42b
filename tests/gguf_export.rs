//! `tuna fuse --gguf`: the file holds what gguf-py and llama.cpp's converter say it must (fixture
//! `tests/fixtures/gguf_export/`, made by its `make.py` with gguf-py, PEFT and transformers), and
//! tuna's own GGUF reader gets the fused model's logits back from it.

use crate::common;

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device};
use common::{reference_dir, rel_l2};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tuna::export::fuse::{FuseOptions, fuse, gguf_path};
use tuna::export::gguf::{GgufType, gguf_tensor_name};
use tuna::formats::gguf::{GgufFile, GgufValue, hf_tensor_name};
use tuna::formats::gguf_write::{self, F16, Q4_0, Q8_0};
use tuna::model::load::{build_model, load_model};
use tuna::source::base::{load_base, open_base};

fn expected() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_export/expected.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn block_quantizers_match_gguf_py() {
    let q = &expected()["quant"];
    let x: Vec<f32> = q["input"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    for (ty, key) in [(Q8_0, "q8_0"), (Q4_0, "q4_0"), (F16, "f16")] {
        let got = gguf_write::encode(ty, &x).unwrap();
        assert_eq!(hex(&got), q[key].as_str().unwrap(), "{key}");
    }
    // 33 values are not whole blocks.
    assert!(gguf_write::encode(Q8_0, &x[..33]).is_err());
}

#[test]
fn tensor_names_round_trip_with_the_reader() {
    for hf in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.11.self_attn.q_proj.bias",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.3.post_attention_layernorm.weight",
    ] {
        let g = gguf_tensor_name(hf).unwrap();
        assert_eq!(hf_tensor_name(&g).as_deref(), Some(hf), "{g}");
    }
    assert_eq!(
        gguf_tensor_name("model.layers.0.self_attn.rotary_emb.inv_freq"),
        None
    );
}

/// Fuses `model` with its reference adapter into `dir`, writing a GGUF of `ty`.
fn fuse_to_gguf(model: &str, ty: GgufType, dir: &Path) -> PathBuf {
    let base = load_base(reference_dir().join(model).to_str().unwrap()).unwrap();
    let adapter = reference_dir().join(format!("{model}-lora"));
    let opts = FuseOptions {
        gguf: Some(ty),
        ..Default::default()
    };
    fuse(&base, &adapter, dir, opts).unwrap();
    gguf_path(dir, ty)
}

fn nul_sha(items: &[String]) -> String {
    hex(&Sha256::digest(items.join("\0").as_bytes()))
}

fn strings(f: &GgufFile, key: &str) -> Vec<String> {
    f.get(key)
        .and_then(GgufValue::as_array)
        .unwrap_or_else(|| panic!("{key} missing"))
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.as_f64().map(|x| (x as i64).to_string()))
                .unwrap()
        })
        .collect()
}

/// Names, dims, metadata, tokenizer and every tensor's values (in llama.cpp's row order) as
/// the fixture has them.
fn check_against_fixture(model: &str, path: &Path) {
    let want = &expected()["models"][model];
    let f = GgufFile::open(path).unwrap();
    for (k, v) in want["metadata"].as_object().unwrap() {
        let got = f.get(k).unwrap_or_else(|| panic!("{model}: {k} missing"));
        match v {
            Value::String(s) => assert_eq!(got.as_str(), Some(s.as_str()), "{model}: {k}"),
            _ => {
                let (g, w) = (got.as_f64().unwrap(), v.as_f64().unwrap());
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs(),
                    "{model}: {k} = {g}, want {w}"
                );
            }
        }
    }
    let tok = &want["tokenizer"];
    assert_eq!(
        nul_sha(&strings(&f, "tokenizer.ggml.tokens")),
        tok["tokens_sha256"],
        "{model}: tokens"
    );
    assert_eq!(
        nul_sha(&strings(&f, "tokenizer.ggml.token_type")),
        tok["token_type_sha256"],
        "{model}: token types"
    );
    assert_eq!(
        nul_sha(&strings(&f, "tokenizer.ggml.merges")),
        tok["merges_sha256"],
        "{model}: merges"
    );
    for (k, id) in tok["special_ids"].as_object().unwrap() {
        let key = match k.as_str() {
            "unk" => "tokenizer.ggml.unknown_token_id".to_string(),
            "pad" => "tokenizer.ggml.padding_token_id".to_string(),
            other => format!("tokenizer.ggml.{other}_token_id"),
        };
        assert_eq!(
            f.get(&key).and_then(GgufValue::as_u64),
            id.as_u64(),
            "{model}: {key}"
        );
    }
    assert_eq!(
        f.get("tokenizer.chat_template").and_then(GgufValue::as_str),
        tok["chat_template"].as_str()
    );

    let tensors = want["tensors"].as_object().unwrap();
    let names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
    let mut want_names: Vec<&str> = tensors.keys().map(String::as_str).collect();
    let mut got_names = names.clone();
    want_names.sort();
    got_names.sort();
    assert_eq!(got_names, want_names, "{model}: tensor names");
    for info in &f.tensors {
        let w = &tensors[&info.name];
        let dims: Vec<u64> = w["dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(info.dims, dims, "{model}: {} dims", info.name);
        let v = f.dequantize_tensor(info).unwrap();
        let close = |got: f64, want: f64, rel: f64| (got - want).abs() <= rel * want.abs() + 1e-5;
        let sumsq: f64 = v.iter().map(|&x| (x as f64).powi(2)).sum();
        assert!(
            close(sumsq, w["sumsq"].as_f64().unwrap(), 2e-3),
            "{model}: {} sum of squares {sumsq} vs {}",
            info.name,
            w["sumsq"]
        );
        for (i, want) in w["at"].as_object().unwrap() {
            let got = v[i.parse::<usize>().unwrap()] as f64;
            let want = want.as_f64().unwrap();
            assert!(
                close(got, want, 1e-3),
                "{model}: {}[{i}] = {got}, want {want}",
                info.name
            );
        }
    }
}

#[test]
fn f16_export_holds_what_gguf_py_and_the_converter_expect() {
    for model in ["tiny-llama", "tiny-qwen2"] {
        let tmp = tempfile::tempdir().unwrap();
        let path = fuse_to_gguf(model, GgufType::F16, tmp.path());
        check_against_fixture(model, &path);
        let f = GgufFile::open(&path).unwrap();
        for t in &f.tensors {
            let want = if t.dims.len() == 1 { 0 } else { 1 };
            assert_eq!(
                t.ggml_type.0, want,
                "{model}: {} is {}",
                t.name, t.ggml_type
            );
        }
        assert_eq!(
            f.get("general.file_type").and_then(GgufValue::as_u64),
            Some(1)
        );
    }
}

/// Logits of the fused HF folder and of the GGUF read back by tuna on the same prompt.
fn logits_pair(model: &str, ty: GgufType) -> (Vec<f32>, Vec<f32>) {
    let tmp = tempfile::tempdir().unwrap();
    let path = fuse_to_gguf(model, ty, tmp.path());
    let dev = Device::flex();
    let fused = load_model(tmp.path(), &dev, DType::F32).unwrap();
    let src = open_base(path.to_str().unwrap()).unwrap();
    let back = build_model(&src.config, src.weights.as_ref(), &dev, DType::F32).unwrap();
    // The GGUF's own tokenizer encodes like the base's.
    let text = "The quick brown fox: 12345 jumps!\n<|im_start|>user";
    let base_tok = tuna::tokenizer::Tokenizer::from_folder(reference_dir().join(model)).unwrap();
    let ids = base_tok.encode(text, true);
    assert_eq!(
        src.tokenizer.encode(text, true),
        ids,
        "{model}: GGUF tokenizer"
    );
    assert_eq!(src.tokenizer.chat_template(), base_tok.chat_template());
    let run = |m: &tuna::model::llama::Llama| {
        m.forward(m.ids_tensor(&ids, 1), None)
            .try_into_vec_as::<f32>()
            .unwrap()
    };
    (run(&fused), run(&back))
}

#[test]
fn gguf_exports_read_back_with_the_fused_models_logits() {
    // f16 storage rounds each weight to 11 significant bits; q8_0 keeps about 7 relative to its
    // block's largest value and q4_0 about 3, which the tiny random models' logits amplify.
    for (model, ty, tol) in [
        ("tiny-llama", GgufType::F16, 2e-3),
        ("tiny-qwen2", GgufType::F16, 2e-3),
        ("tiny-llama", GgufType::Q8_0, 5e-2),
        ("tiny-qwen2", GgufType::Q8_0, 5e-2),
        ("tiny-llama", GgufType::Q4_0, 0.5),
    ] {
        let (fused, back) = logits_pair(model, ty);
        let e = rel_l2(&back, &fused);
        println!("{model} {}: logits rel L2 {e:.2e}", ty.name());
        assert!(e < tol, "{model} {}: logits rel L2 {e}", ty.name());
    }
}

#[test]
fn quantized_exports_store_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let path = fuse_to_gguf("tiny-llama", GgufType::Q4_0, tmp.path());
    let f = GgufFile::open(&path).unwrap();
    let ty = |n: &str| f.tensor(n).unwrap().ggml_type;
    assert_eq!(ty("blk.0.attn_q.weight"), Q4_0);
    assert_eq!(ty("token_embd.weight"), Q8_0, "embeddings keep 8 bits");
    assert_eq!(ty("output.weight"), Q8_0);
    assert_eq!(ty("blk.0.attn_norm.weight").0, 0, "norms stay f32");
    // The intermediate size 88 is not whole blocks of 32: ffn_down rows fall back to f16.
    assert_eq!(ty("blk.0.ffn_down.weight"), F16);
    assert_eq!(
        f.get("general.file_type").and_then(GgufValue::as_u64),
        Some(2)
    );
    // Smaller files the fewer the bits.
    let q8 = fuse_to_gguf("tiny-llama", GgufType::Q8_0, &tmp.path().join("q8"));
    let f16 = fuse_to_gguf("tiny-llama", GgufType::F16, &tmp.path().join("f16"));
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert!(size(&path) < size(&q8) && size(&q8) < size(&f16));
}

#[test]
fn cli_writes_the_gguf_and_rejects_unknown_types() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_tuna");
    let model = reference_dir().join("tiny-llama");
    let adapter = reference_dir().join("tiny-llama-lora");
    let run = |ty: &str| {
        std::process::Command::new(bin)
            .args(["fuse", "--model"])
            .arg(&model)
            .arg("--adapter")
            .arg(&adapter)
            .arg("--out")
            .arg(tmp.path().join("out"))
            .args(["--gguf", ty])
            .output()
            .unwrap()
    };
    let ok = run("q8_0");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(tmp.path().join("out/ggml-model-q8_0.gguf").is_file());
    let bad = run("q5_k");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("q5_k") && err.contains("f16, q8_0 or q4_0"),
        "{err}"
    );
}
