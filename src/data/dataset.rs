//! Tokenized splits and length-grouped, padded batches.
//!
//! Chat and completion examples go through the model's chat template (as mlx-lm does);
//! `mask_prompt` puts the loss on the last assistant turn only. Batches group examples of
//! similar *token* length (mlx-lm sorts by `len()` of the raw record, which for a chat
//! record is its number of keys, so its "length sort" groups nothing), pad with a mask, and
//! the data order is a pure function of (seed, step) so that a resumed run sees the same
//! batches as an uninterrupted one.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use serde_json::{Value, json};

use super::jsonl::{Example, Format, read_split};
use crate::tokenizer::Tokenizer;

/// One tokenized example; the loss covers tokens at positions `>= prompt_len`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
}

#[derive(Debug, Clone)]
pub struct Split {
    pub path: PathBuf,
    pub format: Format,
    pub examples: Vec<Tokenized>,
    /// Examples cut to `max_seq_length`.
    pub truncated: usize,
    /// Examples left with nothing to learn (the answer was cut off entirely), not used.
    pub dropped: usize,
}

#[derive(Debug, Clone)]
pub struct DataSet {
    pub train: Split,
    pub valid: Split,
    pub test: Option<Split>,
}

/// Reads and tokenizes `dir/{train,valid,test}.jsonl`. Missing or empty train/valid
/// splits fail here, before any model is loaded or trained.
/// `vocab_size` is the model's: a tokenizer whose ids reach past it (a tokenizer from another
/// model) fails here, naming the example, instead of indexing out of the embedding.
pub fn load(
    dir: &Path,
    tok: &Tokenizer,
    max_seq_length: usize,
    mask_prompt: bool,
    vocab_size: usize,
) -> Result<DataSet> {
    if !dir.is_dir() {
        bail!(
            "data folder `{}` does not exist (it must hold train.jsonl and valid.jsonl; `tuna data prepare` makes them from a CSV)",
            dir.display()
        );
    }
    let need = |name: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        if !p.is_file() {
            bail!(
                "{}: missing; a data folder needs train.jsonl and valid.jsonl (test.jsonl is optional)",
                p.display()
            );
        }
        Ok(p)
    };
    let split = |p: &Path| tokenize_split(p, tok, max_seq_length, mask_prompt, vocab_size);
    let train = split(&need("train.jsonl")?)?;
    let valid = split(&need("valid.jsonl")?)?;
    let test_path = dir.join("test.jsonl");
    let test = if test_path.is_file() {
        Some(split(&test_path)?)
    } else {
        None
    };
    Ok(DataSet { train, valid, test })
}

/// Tokenizes one split file.
pub fn tokenize_split(
    path: &Path,
    tok: &Tokenizer,
    max_seq_length: usize,
    mask_prompt: bool,
    vocab_size: usize,
) -> Result<Split> {
    let (format, examples) = read_split(path)?;
    if mask_prompt && format == Format::Text {
        bail!(
            "{}: train.mask_prompt needs chat or completion records, but this file holds plain text",
            path.display()
        );
    }
    let mut out = Vec::with_capacity(examples.len());
    let mut truncated = 0;
    let mut dropped = 0;
    for (i, ex) in examples.iter().enumerate() {
        let mut t = tokenize(ex, tok, mask_prompt)
            .map_err(|e| anyhow::anyhow!("{}: example {}: {e:#}", path.display(), i + 1))?;
        if let Some(&id) = t.ids.iter().find(|&&id| id as usize >= vocab_size) {
            bail!(
                "{}: example {}: token id {id} is outside the model's vocabulary of {vocab_size}; \
                 the tokenizer does not belong to this model",
                path.display(),
                i + 1
            );
        }
        if t.ids.len() > max_seq_length {
            t.ids.truncate(max_seq_length);
            truncated += 1;
        }
        if t.ids.len() <= t.prompt_len.max(1) {
            dropped += 1;
            continue;
        }
        out.push(t);
    }
    if out.is_empty() {
        bail!(
            "{}: no example has a token left to learn from after truncation to train.max_seq_length ({max_seq_length})",
            path.display()
        );
    }
    Ok(Split {
        path: path.to_path_buf(),
        format,
        examples: out,
        truncated,
        dropped,
    })
}

/// Tokenizes one example the way mlx-lm's datasets do.
pub fn tokenize(ex: &Example, tok: &Tokenizer, mask_prompt: bool) -> Result<Tokenized> {
    let chat = |messages: &[Value], tools: Option<&Value>| -> Result<Tokenized> {
        let full = tok.apply_chat_template(messages, false, tools)?;
        let ids = tok.try_encode(&full, false)?;
        let prompt_len = if mask_prompt {
            let prompt = tok.apply_chat_template(&messages[..messages.len() - 1], true, tools)?;
            tok.try_encode(&prompt, false)?.len()
        } else {
            0
        };
        Ok(Tokenized { ids, prompt_len })
    };
    match ex {
        Example::Text(text) => {
            let mut ids = tok.try_encode(text, true)?;
            if let Some(eos) = tok.eos_token_id()
                && ids.last() != Some(&eos)
            {
                ids.push(eos);
            }
            Ok(Tokenized { ids, prompt_len: 0 })
        }
        Example::Chat { messages, tools } => {
            if mask_prompt && messages.last().and_then(|m| m["role"].as_str()) != Some("assistant")
            {
                bail!("with train.mask_prompt the last message must be the assistant's answer");
            }
            chat(messages, tools.as_ref())
        }
        Example::Completion { prompt, completion } => {
            let messages = [
                json!({"role": "user", "content": prompt}),
                json!({"role": "assistant", "content": completion}),
            ];
            chat(&messages, None)
        }
    }
}

/// A padded batch in row-major `[batch, seq]` layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    pub ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention: Vec<f32>,
    /// 1 where the token is a prediction target (shifted: logits at t-1 predict token t).
    pub loss_mask: Vec<f32>,
    pub lengths: Vec<usize>,
}

impl Batch {
    /// Number of target tokens (what the loss averages over).
    pub fn target_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m > 0.0).count()
    }

    /// Number of real (non-padding) tokens.
    pub fn tokens(&self) -> usize {
        self.lengths.iter().sum()
    }
}

/// Pads examples into one batch; sequence length is rounded up to a multiple of `round`
/// (fewer distinct shapes means fewer GPU kernel compiles).
pub fn collate(examples: &[&Tokenized], pad_id: u32, round: usize) -> Batch {
    let longest = examples
        .iter()
        .map(|e| e.ids.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let seq = longest.div_ceil(round.max(1)) * round.max(1);
    let b = examples.len();
    let mut ids = vec![pad_id; b * seq];
    let mut attention = vec![0.0; b * seq];
    let mut loss_mask = vec![0.0; b * seq];
    for (r, ex) in examples.iter().enumerate() {
        for (t, &id) in ex.ids.iter().enumerate() {
            ids[r * seq + t] = id;
            attention[r * seq + t] = 1.0;
            if t >= ex.prompt_len.max(1) {
                loss_mask[r * seq + t] = 1.0;
            }
        }
    }
    Batch {
        batch: b,
        seq,
        ids,
        attention,
        loss_mask,
        lengths: examples.iter().map(|e| e.ids.len()).collect(),
    }
}

/// Groups example indices into batches of similar token length (sorted, then chunked).
pub fn length_groups(examples: &[Tokenized], batch_size: usize) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..examples.len()).collect();
    idx.sort_by_key(|&i| (examples[i].ids.len(), i));
    idx.chunks(batch_size.max(1)).map(|c| c.to_vec()).collect()
}

/// The training data order: which batch each step takes. Each epoch visits every batch
/// once in an order drawn from (seed, epoch), so step `s` always gets the same batch.
#[derive(Debug, Clone)]
pub struct Order {
    groups: Vec<Vec<usize>>,
    seed: u64,
}

impl Order {
    pub fn new(examples: &[Tokenized], batch_size: usize, seed: u64) -> Self {
        Order {
            groups: length_groups(examples, batch_size),
            seed,
        }
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.groups.len()
    }

    /// The example indices of the batch at 0-based `step`.
    pub fn at(&self, step: u64) -> &[usize] {
        let n = self.groups.len() as u64;
        let epoch = step / n;
        let perm = permutation(
            self.groups.len(),
            self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        &self.groups[perm[(step % n) as usize]]
    }
}

/// A seeded permutation (Fisher–Yates over SplitMix64) that never changes across versions.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64(seed);
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        p.swap(i, j);
    }
    p
}

/// SplitMix64: tiny, fast, and fixed forever, unlike a library RNG whose stream may change.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(len: usize, prompt_len: usize) -> Tokenized {
        Tokenized {
            ids: (1..=len as u32).collect(),
            prompt_len,
        }
    }

    #[test]
    fn batches_group_similar_lengths() {
        let examples: Vec<Tokenized> = [9, 2, 30, 3, 31, 10].iter().map(|&l| ex(l, 0)).collect();
        let groups = length_groups(&examples, 2);
        let lens: Vec<Vec<usize>> = groups
            .iter()
            .map(|g| g.iter().map(|&i| examples[i].ids.len()).collect())
            .collect();
        assert_eq!(lens, vec![vec![2, 3], vec![9, 10], vec![30, 31]]);
    }

    #[test]
    fn collate_pads_and_masks() {
        let a = ex(3, 2);
        let b = ex(5, 0);
        let batch = collate(&[&a, &b], 0, 4);
        assert_eq!((batch.batch, batch.seq), (2, 8));
        assert_eq!(&batch.ids[..8], &[1, 2, 3, 0, 0, 0, 0, 0]);
        assert_eq!(&batch.attention[..8], &[1., 1., 1., 0., 0., 0., 0., 0.]);
        // Row 0: only token 2 (the answer) is a target; row 1: tokens 1..5 (never token 0).
        assert_eq!(&batch.loss_mask[..8], &[0., 0., 1., 0., 0., 0., 0., 0.]);
        assert_eq!(&batch.loss_mask[8..], &[0., 1., 1., 1., 1., 0., 0., 0.]);
        assert_eq!(batch.target_tokens(), 5);
    }

    #[test]
    fn order_is_a_function_of_seed_and_step() {
        let examples: Vec<Tokenized> = (1..=10).map(|l| ex(l, 0)).collect();
        let o = Order::new(&examples, 3, 7);
        assert_eq!(o.batches_per_epoch(), 4);
        let first: Vec<Vec<usize>> = (0..8).map(|s| o.at(s).to_vec()).collect();
        let again = Order::new(&examples, 3, 7);
        assert_eq!(
            first,
            (0..8).map(|s| again.at(s).to_vec()).collect::<Vec<_>>()
        );
        let mut epoch0: Vec<usize> = first[..4].iter().flatten().copied().collect();
        epoch0.sort();
        assert_eq!(
            epoch0,
            (0..10).collect::<Vec<_>>(),
            "an epoch visits every example once"
        );
        let other = Order::new(&examples, 3, 8);
        assert_ne!(
            first,
            (0..8).map(|s| other.at(s).to_vec()).collect::<Vec<_>>()
        );
    }
}
