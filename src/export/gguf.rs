//! `tuna fuse --gguf f16|q8_0|q4_0`: a fused model as one GGUF file that llama.cpp (and Ollama)
//! load. It follows what llama.cpp's `convert_hf_to_gguf.py` writes: its tensor names, Q/K rows
//! of llama-type models permuted into llama.cpp's interleaved rotary order, 1-D tensors kept in
//! f32, the architecture metadata, and the tokenizer (vocabulary, merges, token types, special
//! ids, chat template) in `tokenizer.ggml.*`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::formats::gguf::token_type;
use crate::formats::gguf_write::{self, F16, F32, MetaValue, Q4_0, Q8_0, TensorPlan};
use crate::formats::weights::RawWeights;
use crate::model::config::{Architecture, ModelConfig, RopeScaling};
use crate::tokenizer::Tokenizer;

/// The storage type of a GGUF export's matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F16,
    Q8_0,
    Q4_0,
}

impl GgufType {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f16" => Self::F16,
            "q8_0" => Self::Q8_0,
            "q4_0" => Self::Q4_0,
            other => bail!("--gguf `{other}`: use f16, q8_0 or q4_0"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`).
    fn file_type(self) -> u32 {
        match self {
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
        }
    }
}

/// llama.cpp's name for an HF tensor name (`model.layers.3.mlp.up_proj.weight` →
/// `blk.3.ffn_up.weight`); the inverse of [`crate::formats::gguf::hf_tensor_name`].
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    use crate::formats::gguf::{BLOCK_TENSOR_NAMES, MODEL_TENSOR_NAMES};
    let (base, suffix) = hf.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    if let Some((g, _)) = MODEL_TENSOR_NAMES.iter().find(|(_, h)| *h == base) {
        return Some(format!("{g}.{suffix}"));
    }
    let (layer, part) = base.strip_prefix("model.layers.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (g, _) = BLOCK_TENSOR_NAMES.iter().find(|(_, h)| *h == part)?;
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// llama.cpp's converter permutation of Q/K rows (`LlamaModel.permute`): inside each head,
/// HF row `s * head_dim/2 + j` moves to `2j + s`, interleaving the two rotary halves.
pub fn permute_qk_rows(data: &[f32], rows: usize, cols: usize, n_heads: usize) -> Option<Vec<f32>> {
    if n_heads == 0 || !rows.is_multiple_of(n_heads) || data.len() != rows * cols {
        return None;
    }
    let hd = rows / n_heads;
    if !hd.is_multiple_of(2) {
        return None;
    }
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_heads {
        for s in 0..2 {
            for j in 0..half {
                let src = h * hd + s * half + j;
                let dst = h * hd + 2 * j + s;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Some(out)
}

/// The architecture name llama.cpp uses (Mistral is written as `llama`, as its converter does).
fn arch_name(config: &ModelConfig) -> &'static str {
    match config.architecture {
        Architecture::Llama | Architecture::Mistral => "llama",
        Architecture::Qwen2 => "qwen2",
    }
}

/// The storage type of one tensor: 1-D tensors in f32 (as llama.cpp keeps norms and biases);
/// matrices in `ty`, except that q4_0 keeps the embeddings and the output head in q8_0 (llama.cpp's
/// quantizer also spends more bits there), and a row that is not whole blocks falls back to f16.
fn storage_type(gguf_name: &str, dims: &[u64], ty: GgufType) -> crate::formats::gguf::GgmlType {
    if dims.len() < 2 {
        return F32;
    }
    let whole_blocks = dims[0].is_multiple_of(32);
    match ty {
        GgufType::F16 => F16,
        _ if !whole_blocks => F16,
        GgufType::Q8_0 => Q8_0,
        GgufType::Q4_0 if gguf_name.starts_with("token_embd") || gguf_name == "output.weight" => {
            Q8_0
        }
        GgufType::Q4_0 => Q4_0,
    }
}

/// Writes `weights` (HF names, f32) with `config` and `tokenizer` as a GGUF file at `path`.
pub fn write_gguf_model(
    weights: &RawWeights,
    config: &ModelConfig,
    tokenizer: &Tokenizer,
    name: &str,
    ty: GgufType,
    path: &Path,
) -> Result<()> {
    let arch = arch_name(config);
    let permute = arch == "llama";
    let mut plans = Vec::new();
    let mut sources = Vec::new();
    for (hf, t) in weights {
        let g = gguf_tensor_name(hf)
            .with_context(|| format!("`{hf}` has no llama.cpp tensor name ({arch})"))?;
        let dims: Vec<u64> = t.shape.iter().rev().map(|&d| d as u64).collect();
        let heads = if !permute {
            None
        } else if hf.contains(".self_attn.q_proj.") {
            Some(config.num_attention_heads)
        } else if hf.contains(".self_attn.k_proj.") {
            Some(config.num_key_value_heads)
        } else {
            None
        };
        plans.push(TensorPlan {
            ty: storage_type(&g, &dims, ty),
            name: g,
            dims,
        });
        sources.push((hf.clone(), heads));
    }
    if let Some(RopeScaling::Llama3 { .. }) = config.rope_scaling {
        // llama.cpp reads Llama 3.x rope scaling as per-frequency divisors.
        plans.push(TensorPlan {
            name: "rope_freqs.weight".into(),
            dims: vec![(config.head_dim / 2) as u64],
            ty: F32,
        });
    }
    let vocab_rows = weights
        .get("model.embed_tokens.weight")
        .map(|t| t.shape[0])
        .unwrap_or(config.vocab_size);
    let mut meta = model_metadata(config, arch, name, ty);
    meta.extend(tokenizer_metadata(tokenizer, vocab_rows)?);

    let pb = indicatif::ProgressBar::new(plans.len() as u64)
        .with_message(format!("writing {}", path.display()));
    gguf_write::write_gguf(path, &meta, &plans, |i| {
        pb.inc(1);
        let plan = &plans[i];
        let Some((hf, heads)) = sources.get(i) else {
            let base = config_without_scaling(config).rope_inv_freq();
            let scaled = config.rope_inv_freq();
            let div: Vec<f32> = base
                .iter()
                .zip(&scaled)
                .map(|(b, s)| (b / s) as f32)
                .collect();
            return gguf_write::encode(F32, &div);
        };
        let t = &weights[hf];
        let data = match heads {
            Some(h) => {
                let rows = t.shape[0];
                let cols: usize = t.shape[1..].iter().product();
                std::borrow::Cow::Owned(permute_qk_rows(&t.data, rows, cols, *h).with_context(
                    || {
                        format!(
                            "`{hf}` {:?} does not split into {h} heads of even size",
                            t.shape
                        )
                    },
                )?)
            }
            None => std::borrow::Cow::Borrowed(&t.data),
        };
        gguf_write::encode(plan.ty, &data)
    })?;
    pb.finish_and_clear();
    Ok(())
}

fn config_without_scaling(config: &ModelConfig) -> ModelConfig {
    ModelConfig {
        rope_scaling: None,
        ..config.clone()
    }
}

/// `general.*` and `{arch}.*` metadata, as llama.cpp's converter writes them.
fn model_metadata(
    config: &ModelConfig,
    arch: &str,
    name: &str,
    ty: GgufType,
) -> Vec<(String, MetaValue)> {
    let k = |s: &str| format!("{arch}.{s}");
    let mut m = vec![
        ("general.architecture".into(), MetaValue::Str(arch.into())),
        ("general.type".into(), MetaValue::Str("model".into())),
        ("general.name".into(), MetaValue::Str(name.into())),
        ("general.file_type".into(), MetaValue::U32(ty.file_type())),
        ("general.quantization_version".into(), MetaValue::U32(2)),
        (
            k("block_count"),
            MetaValue::U32(config.num_hidden_layers as u32),
        ),
        (
            k("context_length"),
            MetaValue::U32(config.max_position_embeddings as u32),
        ),
        (
            k("embedding_length"),
            MetaValue::U32(config.hidden_size as u32),
        ),
        (
            k("feed_forward_length"),
            MetaValue::U32(config.intermediate_size as u32),
        ),
        (
            k("attention.head_count"),
            MetaValue::U32(config.num_attention_heads as u32),
        ),
        (
            k("attention.head_count_kv"),
            MetaValue::U32(config.num_key_value_heads as u32),
        ),
        (
            k("rope.freq_base"),
            MetaValue::F32(config.rope_theta as f32),
        ),
        (
            k("attention.layer_norm_rms_epsilon"),
            MetaValue::F32(config.rms_norm_eps as f32),
        ),
        (
            k("rope.dimension_count"),
            MetaValue::U32(config.head_dim as u32),
        ),
        (k("vocab_size"), MetaValue::U32(config.vocab_size as u32)),
    ];
    if config.head_dim * config.num_attention_heads != config.hidden_size {
        m.push((
            k("attention.key_length"),
            MetaValue::U32(config.head_dim as u32),
        ));
        m.push((
            k("attention.value_length"),
            MetaValue::U32(config.head_dim as u32),
        ));
    }
    if let Some(RopeScaling::Linear { factor }) = config.rope_scaling {
        m.push((k("rope.scaling.type"), MetaValue::Str("linear".into())));
        m.push((k("rope.scaling.factor"), MetaValue::F32(factor as f32)));
    }
    m
}

/// The pre-tokenizer of a byte-level BPE tokenizer by llama.cpp's name for it
/// (`tokenizer.ggml.pre`), found by comparing with the ones tuna's GGUF reader builds.
fn bpe_pre_name(pre_tokenizer: &Value) -> Option<&'static str> {
    let canon = |v: &Value| -> Option<Value> {
        let p: tokenizers::PreTokenizerWrapper = serde_json::from_value(v.clone()).ok()?;
        serde_json::to_value(p).ok()
    };
    let want = canon(pre_tokenizer)?;
    ["gpt-2", "smollm", "llama-bpe", "qwen2"]
        .into_iter()
        .find(|name| {
            crate::formats::gguf::bpe_pre_tokenizer_json(name)
                .and_then(|v| canon(&v))
                .is_some_and(|v| v == want)
        })
}

/// `tokenizer.ggml.*`: the vocabulary padded to the embedding's rows (extra rows are
/// `[PAD{i}]`, unused, as llama.cpp's converter names them), merges, token types, special ids and
/// the chat template.
fn tokenizer_metadata(tok: &Tokenizer, vocab_rows: usize) -> Result<Vec<(String, MetaValue)>> {
    let doc: Value = serde_json::from_str(
        &tok.inner()
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("cannot serialize the tokenizer: {e}"))?,
    )?;
    let model = &doc["model"];
    if model["type"] != "BPE" {
        bail!(
            "GGUF export supports BPE tokenizers (byte-level or SentencePiece-style); this one is {}",
            model["type"]
        );
    }
    let n = tok.vocab_size().max(vocab_rows);
    if tok.vocab_size() > vocab_rows {
        bail!(
            "the tokenizer has {} tokens but the embedding only {vocab_rows} rows",
            tok.vocab_size()
        );
    }
    let added: std::collections::HashMap<u32, bool> = doc["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| {
            Some((
                t["id"].as_u64()? as u32,
                t["special"].as_bool().unwrap_or(false),
            ))
        })
        .collect();
    let spm = model["byte_fallback"].as_bool().unwrap_or(false);
    let unk = tok
        .special_tokens()
        .unk_token
        .as_deref()
        .and_then(|u| tok.token_to_id(u));
    let mut tokens = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for id in 0..n as u32 {
        match tok.id_to_token(id) {
            Some(t) => {
                let ty = match added.get(&id) {
                    Some(true) => token_type::CONTROL,
                    Some(false) => token_type::USER_DEFINED,
                    None if Some(id) == unk => token_type::UNKNOWN,
                    None if spm && is_byte_token(&t) => token_type::BYTE,
                    None => token_type::NORMAL,
                };
                tokens.push(t);
                types.push(ty as i32);
            }
            None => {
                tokens.push(format!("[PAD{id}]"));
                types.push(token_type::UNUSED as i32);
            }
        }
    }
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .collect();
    let mut m = Vec::new();
    if spm {
        // SentencePiece BPE: llama.cpp merges by the merged piece's score; a piece made by
        // merge r scores -r, so its merges apply in the tokenizer's order.
        let mut scores = vec![0f32; n];
        for (rank, merge) in merges.iter().enumerate() {
            if let Some(id) = tok.token_to_id(&merge.replace(' ', "")) {
                let s = &mut scores[id as usize];
                if *s == 0.0 {
                    *s = -(rank as f32) - 1.0;
                }
            }
        }
        m.push((
            "tokenizer.ggml.model".into(),
            MetaValue::Str("llama".into()),
        ));
        m.push(("tokenizer.ggml.tokens".into(), MetaValue::StrArray(tokens)));
        m.push(("tokenizer.ggml.scores".into(), MetaValue::F32Array(scores)));
        m.push((
            "tokenizer.ggml.token_type".into(),
            MetaValue::I32Array(types),
        ));
        let add_space = doc["normalizer"].to_string().contains("Prepend");
        m.push((
            "tokenizer.ggml.add_space_prefix".into(),
            MetaValue::Bool(add_space),
        ));
    } else {
        let pre = bpe_pre_name(&doc["pre_tokenizer"]).with_context(|| {
            format!(
                "the tokenizer's pre-tokenizer is not one llama.cpp names (gpt-2, smollm, llama-bpe, qwen2): {}",
                doc["pre_tokenizer"]
            )
        })?;
        m.push(("tokenizer.ggml.model".into(), MetaValue::Str("gpt2".into())));
        m.push(("tokenizer.ggml.pre".into(), MetaValue::Str(pre.into())));
        m.push(("tokenizer.ggml.tokens".into(), MetaValue::StrArray(tokens)));
        m.push((
            "tokenizer.ggml.token_type".into(),
            MetaValue::I32Array(types),
        ));
        m.push(("tokenizer.ggml.merges".into(), MetaValue::StrArray(merges)));
    }
    let id = |t: Option<&str>| t.and_then(|t| tok.token_to_id(t));
    let special = tok.special_tokens();
    for (key, v) in [
        (
            "bos_token_id",
            tok.bos_token_id().or(id(special.bos_token.as_deref())),
        ),
        (
            "eos_token_id",
            id(special.eos_token.as_deref()).or(tok.eos_token_id()),
        ),
        ("unknown_token_id", unk),
        ("padding_token_id", id(special.pad_token.as_deref())),
    ] {
        if let Some(v) = v {
            m.push((format!("tokenizer.ggml.{key}"), MetaValue::U32(v)));
        }
    }
    m.push((
        "tokenizer.ggml.add_bos_token".into(),
        MetaValue::Bool(tok.add_bos_token()),
    ));
    m.push((
        "tokenizer.ggml.add_eos_token".into(),
        MetaValue::Bool(special.add_eos_token),
    ));
    if let Some(t) = tok.chat_template() {
        m.push(("tokenizer.chat_template".into(), MetaValue::Str(t.into())));
    }
    Ok(m)
}

/// SentencePiece's byte-fallback pieces, `<0x00>` … `<0xFF>`.
fn is_byte_token(t: &str) -> bool {
    t.len() == 6 && t.starts_with("<0x") && t.ends_with('>')
}
