//! Tokenizer: a `tokenizers::Tokenizer` plus what Hugging Face keeps next to it (special tokens,
//! `add_bos_token`, end-of-sequence ids) and the chat template (`chat_template`).

pub mod chat_template;

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use chat_template::ChatTemplate;

/// Special-token settings that live outside `tokenizer.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// Prepend the BOS token when encoding with special tokens (if the post-processor did not).
    pub add_bos_token: bool,
    /// Append the EOS token when encoding with special tokens (if the post-processor did not).
    pub add_eos_token: bool,
    /// Further end-of-sequence ids (from `generation_config.json` / `config.json`), tried first.
    pub extra_eos_token_ids: Vec<u32>,
    /// transformers' `clean_up_tokenization_spaces` on decode.
    pub clean_up_tokenization_spaces: bool,
}

/// A tokenizer with its chat template.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    pad_id: Option<u32>,
    chat_template: Option<String>,
    compiled: Option<ChatTemplate>,
    source: String,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    Ok(Some(v))
}

/// A token in `tokenizer_config.json`: a string or an AddedToken object `{"content": ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Token ids given as a number or a list of numbers.
fn id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// The chat template in a `tokenizer_config.json` value: a string, or a list of
/// `{"name", "template"}` (the one named `default`, else the first).
fn template_from_config(v: &Value) -> Option<String> {
    match v.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => {
            let pick = list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())?;
            pick.get("template")?.as_str().map(str::to_string)
        }
        _ => None,
    }
}

impl Tokenizer {
    /// Loads a Hugging Face tokenizer folder: `tokenizer.json` (required), the chat template
    /// from `chat_template.jinja`, `chat_template.json` or `tokenizer_config.json`, special
    /// tokens from `tokenizer_config.json`, and end-of-sequence ids from
    /// `generation_config.json` and `config.json`.
    pub fn from_folder(dir: impl AsRef<Path>) -> Result<Tokenizer> {
        let dir = dir.as_ref();
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            bail!(
                "{}: no tokenizer.json in this folder (a Hugging Face model folder needs tokenizer.json; \
                 slow-tokenizer-only checkpoints such as tokenizer.model are not supported)",
                tok_path.display()
            );
        }
        let inner = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", tok_path.display()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = read_json(&cfg_path)?.unwrap_or(Value::Null);
        let gen_cfg = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let model_cfg = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);

        let jinja_path = dir.join("chat_template.jinja");
        let json_tmpl_path = dir.join("chat_template.json");
        let (template, origin) = if jinja_path.is_file() {
            let t = std::fs::read_to_string(&jinja_path)
                .with_context(|| format!("cannot read {}", jinja_path.display()))?;
            (Some(t), jinja_path.display().to_string())
        } else if let Some(v) = read_json(&json_tmpl_path)?
            && let Some(t) = template_from_config(&v)
        {
            (Some(t), json_tmpl_path.display().to_string())
        } else if let Some(t) = template_from_config(&cfg) {
            (Some(t), format!("{} (chat_template)", cfg_path.display()))
        } else {
            (None, dir.display().to_string())
        };

        let mut extra = id_list(gen_cfg.get("eos_token_id"));
        for id in id_list(model_cfg.get("eos_token_id")) {
            if !extra.contains(&id) {
                extra.push(id);
            }
        }
        // Token strings from tokenizer_config.json, else from the ids in
        // generation_config.json / config.json.
        let from_ids = |key: &str| {
            id_list(gen_cfg.get(key))
                .into_iter()
                .chain(id_list(model_cfg.get(key)))
                .find_map(|id| inner.id_to_token(id))
        };
        let special = SpecialTokens {
            bos_token: token_string(cfg.get("bos_token")).or_else(|| from_ids("bos_token_id")),
            eos_token: token_string(cfg.get("eos_token")).or_else(|| from_ids("eos_token_id")),
            pad_token: token_string(cfg.get("pad_token")),
            unk_token: token_string(cfg.get("unk_token")),
            add_bos_token: cfg
                .get("add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            add_eos_token: cfg
                .get("add_eos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            extra_eos_token_ids: extra,
            clean_up_tokenization_spaces: cfg
                .get("clean_up_tokenization_spaces")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        };
        Self::from_parts(
            inner,
            template,
            &origin,
            special,
            &dir.display().to_string(),
        )
    }

    /// Assembles a tokenizer from its parts. `template_origin` names where the template came
    /// from (used in error messages), `source` names the tokenizer's origin.
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        chat_template: Option<String>,
        template_origin: &str,
        special: SpecialTokens,
        source: &str,
    ) -> Result<Tokenizer> {
        let bos_id = special
            .bos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t));
        let pad_id = special
            .pad_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t));
        let mut eos_ids = special.extra_eos_token_ids.clone();
        if let Some(id) = special
            .eos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            && !eos_ids.contains(&id)
        {
            eos_ids.push(id);
        }
        let compiled = match &chat_template {
            Some(t) => Some(ChatTemplate::new(t, template_origin)?),
            None => None,
        };
        Ok(Tokenizer {
            inner,
            special,
            bos_id,
            eos_ids,
            pad_id,
            chat_template,
            compiled,
            source: source.to_string(),
        })
    }

    /// Token ids of `text`. With `add_special`, the post-processor's special tokens are added,
    /// and BOS/EOS where `add_bos_token`/`add_eos_token` ask for them and they are not there.
    ///
    /// Panics only if the underlying `tokenizers` model fails, which byte-level BPE and
    /// byte-fallback models cannot; [`Tokenizer::try_encode`] returns the error instead.
    pub fn encode(&self, text: &str, add_special: bool) -> Vec<u32> {
        match self.try_encode(text, add_special) {
            Ok(ids) => ids,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// [`Tokenizer::encode`], returning tokenizer errors.
    pub fn try_encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special)
            .map_err(|e| anyhow!("{}: cannot encode text: {e}", self.source))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special {
            if self.special.add_bos_token
                && let Some(b) = self.bos_id
                && ids.first() != Some(&b)
            {
                ids.insert(0, b);
            }
            if self.special.add_eos_token
                && let Some(&e) = self.eos_ids.last()
                && ids.last() != Some(&e)
            {
                ids.push(e);
            }
        }
        Ok(ids)
    }

    /// Text of `ids`. Unknown ids are dropped (as `tokenizers` does).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let s = self
            .inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("{}: cannot decode ids: {e}", self.source))?;
        Ok(if self.special.clean_up_tokenization_spaces {
            clean_up_tokenization(&s)
        } else {
            s
        })
    }

    /// End-of-sequence ids: `generation_config.json`'s (which may be a list), then
    /// `config.json`'s, then the id of `eos_token`.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_ids.clone()
    }

    /// The id of the first end-of-sequence token, if any.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_ids.first().copied()
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The padding id: `pad_token`'s, else the first EOS id.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_id.or_else(|| self.eos_token_id())
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.special.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.special.eos_token.as_deref()
    }

    pub fn add_bos_token(&self) -> bool {
        self.special.add_bos_token
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Renders the chat template for `messages` (`{"role", "content", ...}` objects), like
    /// transformers' `apply_chat_template(tokenize=False)`.
    pub fn apply_chat_template(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        tools: Option<&Value>,
    ) -> Result<String> {
        let Some(template) = &self.compiled else {
            bail!(
                "{}: this tokenizer has no chat template (looked for chat_template.jinja, \
                 chat_template.json and tokenizer_config.json's chat_template)",
                self.source
            );
        };
        template.render(messages, add_generation_prompt, tools, &self.special)
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (special tokens, `add_bos_token`,
    /// chat template) into `dir`, and `chat_template.jinja` when there is a template.
    pub fn save_folder(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let tok_path = dir.join("tokenizer.json");
        let text = self
            .inner
            .to_string(false)
            .map_err(|e| anyhow!("{}: cannot serialize tokenizer: {e}", tok_path.display()))?;
        std::fs::write(&tok_path, text)
            .with_context(|| format!("cannot write {}", tok_path.display()))?;
        let mut cfg = serde_json::Map::new();
        let s = &self.special;
        for (k, v) in [
            ("bos_token", &s.bos_token),
            ("eos_token", &s.eos_token),
            ("pad_token", &s.pad_token),
            ("unk_token", &s.unk_token),
        ] {
            cfg.insert(k.into(), v.clone().map(Value::from).unwrap_or(Value::Null));
        }
        cfg.insert("add_bos_token".into(), s.add_bos_token.into());
        cfg.insert("add_eos_token".into(), s.add_eos_token.into());
        cfg.insert(
            "clean_up_tokenization_spaces".into(),
            s.clean_up_tokenization_spaces.into(),
        );
        cfg.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        if let Some(t) = &self.chat_template {
            cfg.insert("chat_template".into(), t.clone().into());
        }
        let cfg_path = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&Value::Object(cfg))?;
        std::fs::write(&cfg_path, text)
            .with_context(|| format!("cannot write {}", cfg_path.display()))?;
        if let Some(t) = &self.chat_template {
            let p = dir.join("chat_template.jinja");
            std::fs::write(&p, t).with_context(|| format!("cannot write {}", p.display()))?;
        }
        Ok(())
    }
}

/// transformers' `clean_up_tokenization`: removes spaces before punctuation and contractions.
fn clean_up_tokenization(s: &str) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}
