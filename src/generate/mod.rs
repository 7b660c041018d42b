//! Text generation with the KV cache: sampling, EOS and stop strings, token streaming.
//!
//! The tokenizer lives elsewhere (`model::tokenizer`), so stop strings and streamed text use a
//! caller-supplied `decode` callback; without one, only token ids are produced.

pub mod answers;
pub mod cli;
pub mod sampling;

use anyhow::{Result, bail};

use crate::model::config::ModelConfig;
use crate::model::llama::{KvCache, Llama};
pub use sampling::{Sampler, SamplingConfig, argmax};

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Generation ends when one of these is produced (it is not part of the output).
    pub eos_token_ids: Vec<u32>,
    /// Generation ends when the decoded text contains one of these (needs `decode`); the text
    /// is cut before it.
    pub stop_strings: Vec<String>,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            sampling: SamplingConfig::default(),
            eos_token_ids: Vec::new(),
            stop_strings: Vec::new(),
        }
    }
}

impl GenerateConfig {
    /// Adds the model's EOS ids (from `config.json`, or GGUF metadata) to the stop ids.
    pub fn with_model_eos(mut self, config: &ModelConfig) -> Self {
        for &id in &config.eos_token_ids {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    /// The streaming callback asked to stop.
    Cancelled,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated ids, without the prompt and without a final EOS.
    pub tokens: Vec<u32>,
    /// Decoded text (cut at a stop string), when a decoder was given.
    pub text: Option<String>,
    pub stop_reason: StopReason,
}

/// One streamed step.
#[derive(Debug, Clone)]
pub struct TokenEvent<'a> {
    pub token: u32,
    /// 0-based index among the generated tokens.
    pub index: usize,
    /// Newly final text: held back while it could still be the start of a stop string or an
    /// incomplete UTF-8 sequence; empty without a decoder.
    pub text: &'a str,
}

/// Turns generated ids into text (the tokenizer's decode).
pub type Decode<'a> = &'a dyn Fn(&[u32]) -> Result<String>;

/// Length of the longest suffix of `text` that is a proper prefix of some stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if i > hold && text.ends_with(&s[..i]) {
                hold = i;
            }
        }
    }
    hold
}

/// Generates from `prompt`. `on_token` sees each token as it is produced and returns `false` to
/// stop early. Batch size 1; the prompt is prefilled in one call, then one token per step.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    config: &GenerateConfig,
    decode: Option<Decode>,
    on_token: &mut dyn FnMut(&TokenEvent) -> bool,
) -> Result<Generation> {
    if prompt.is_empty() {
        bail!("generate: empty prompt");
    }
    if !config.stop_strings.is_empty() && decode.is_none() {
        bail!("generate: stop strings need a decode callback");
    }
    let mut sampler = Sampler::new(config.sampling.clone());
    let mut cache = KvCache::new();
    let mut context: Vec<u32> = prompt.to_vec();
    let mut tokens: Vec<u32> = Vec::new();
    let mut emitted = 0usize; // bytes of decoded text already streamed
    let mut text = String::new();
    let mut logits = model.forward_cached(model.ids_tensor(prompt, 1), &mut cache, None);
    let mut stop_reason = StopReason::MaxTokens;
    while tokens.len() < config.max_new_tokens {
        let row = logits.try_into_vec_as::<f32>()?;
        let next = sampler.sample(&row, &context);
        if config.eos_token_ids.contains(&next) {
            stop_reason = StopReason::Eos;
            break;
        }
        tokens.push(next);
        context.push(next);
        let mut delta = "";
        let mut hit_stop: Option<usize> = None;
        if let Some(decode) = decode {
            text = decode(&tokens)?;
            let found = config
                .stop_strings
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min();
            let end = match found {
                Some(pos) => {
                    hit_stop = Some(pos);
                    pos
                }
                None => {
                    let mut end = text.len() - held_back(&text, &config.stop_strings);
                    if text[..end].ends_with('\u{FFFD}') {
                        end -= '\u{FFFD}'.len_utf8();
                    }
                    end
                }
            };
            if end > emitted && text.is_char_boundary(emitted) {
                delta = &text[emitted..end];
                emitted = end;
            }
        }
        let keep_going = on_token(&TokenEvent {
            token: next,
            index: tokens.len() - 1,
            text: delta,
        });
        if let Some(pos) = hit_stop {
            text.truncate(pos);
            stop_reason = StopReason::StopString;
            break;
        }
        if !keep_going {
            stop_reason = StopReason::Cancelled;
            break;
        }
        if tokens.len() == config.max_new_tokens {
            break;
        }
        logits = model.forward_cached(model.ids_tensor(&[next], 1), &mut cache, None);
    }
    Ok(Generation {
        tokens,
        text: decode.map(|_| text),
        stop_reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_partial_stop() {
        let stops = vec!["<|im_end|>".to_string()];
        assert_eq!(held_back("hello <|im", &stops), 4);
        assert_eq!(held_back("hello", &stops), 0);
    }
}
