//! Tokenizer: a `tokenizers::Tokenizer` plus what Hugging Face keeps next to it (special tokens,
//! `add_bos_token`, end-of-sequence ids) and the Jinja chat template, rendered the way
//! transformers does (jinja2 with `trim_blocks`, `lstrip_blocks`, `raise_exception`,
//! `strftime_now`, Python string methods, and a `tojson` that writes like Python's `json.dumps`).

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use minijinja::value::Kwargs;
use minijinja::{Environment, Error as JinjaError, ErrorKind as JinjaErrorKind, Value as JValue};
use serde_json::Value;

/// Name of the compiled chat template inside the Jinja environment.
const TEMPLATE_NAME: &str = "chat_template";

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
    template_origin: String,
    env: Option<Environment<'static>>,
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
        let env = match &chat_template {
            Some(t) => Some(build_env(t).map_err(|e| {
                anyhow!(
                    "{template_origin}: invalid chat template: {}",
                    describe_jinja_error(&e)
                )
            })?),
            None => None,
        };
        Ok(Tokenizer {
            inner,
            special,
            bos_id,
            eos_ids,
            pad_id,
            chat_template,
            template_origin: template_origin.to_string(),
            env,
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

    /// Text of `ids`. Unknown ids are dropped (as `tokenizers` does). See
    /// [`Tokenizer::try_decode`] for a fallible version.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        match self.try_decode(ids, skip_special) {
            Ok(s) => s,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// [`Tokenizer::decode`], returning tokenizer errors.
    pub fn try_decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
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
        let Some(env) = &self.env else {
            bail!(
                "{}: this tokenizer has no chat template (looked for chat_template.jinja, \
                 chat_template.json and tokenizer_config.json's chat_template)",
                self.template_origin
            );
        };
        let tmpl = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| anyhow!("{}: {}", self.template_origin, describe_jinja_error(&e)))?;
        let opt = |s: &Option<String>| match s {
            Some(s) => JValue::from(s.as_str()),
            None => JValue::from(()),
        };
        let ctx = minijinja::context! {
            messages => JValue::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            tools => match tools { Some(t) => JValue::from_serialize(t), None => JValue::from(()) },
            documents => JValue::from(()),
            bos_token => opt(&self.special.bos_token),
            eos_token => opt(&self.special.eos_token),
            pad_token => opt(&self.special.pad_token),
            unk_token => opt(&self.special.unk_token),
        };
        tmpl.render(ctx).map_err(|e| {
            anyhow!(
                "{}: cannot render chat template: {}",
                self.template_origin,
                describe_jinja_error(&e)
            )
        })
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

fn describe_jinja_error(e: &JinjaError) -> String {
    let mut s = e.to_string();
    if let Some(line) = e.line() {
        s.push_str(&format!(" (template line {line})"));
    }
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    s
}

fn build_env(template: &str) -> std::result::Result<Environment<'static>, JinjaError> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    minijinja_contrib::add_to_environment(&mut env);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<JValue, JinjaError> {
            Err(JinjaError::new(JinjaErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |fmt: String| -> String {
        strftime(&fmt, now_utc())
    });
    env.add_filter("tojson", tojson);
    env.add_template_owned(TEMPLATE_NAME, template.to_string())?;
    Ok(env)
}

// ---------------------------------------------------------------------------------------------
// tojson like Python's json.dumps(x, ensure_ascii=False, indent=indent, separators=..., sort_keys=...)
// ---------------------------------------------------------------------------------------------

fn tojson(value: JValue, kwargs: Kwargs) -> std::result::Result<JValue, JinjaError> {
    let indent: Option<JValue> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<JValue> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent: Option<String> = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => {
            if let Some(s) = v.as_str() {
                Some(s.to_string())
            } else if let Ok(n) = i64::try_from(v.clone()) {
                Some(" ".repeat(n.max(0) as usize))
            } else {
                return Err(JinjaError::new(
                    JinjaErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        }
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let a = v.get_item_by_index(0)?;
            let b = v.get_item_by_index(1)?;
            match (a.as_str(), b.as_str()) {
                (Some(a), Some(b)) => (a.to_string(), b.to_string()),
                _ => {
                    return Err(JinjaError::new(
                        JinjaErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ));
                }
            }
        }
        _ => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
    };
    let json = serde_json::to_value(&value).map_err(|e| {
        JinjaError::new(JinjaErrorKind::InvalidOperation, "tojson: cannot serialize").with_source(e)
    })?;
    let opts = DumpOptions {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    dump(&json, &opts, 0, &mut out);
    Ok(JValue::from_safe_string(out))
}

struct DumpOptions {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn dump_str(s: &str, ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{:04x}", u));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn dump_number(n: &serde_json::Number, out: &mut String) {
    if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
        // Python writes floats with repr(): always a '.', or an exponent.
        if f.is_finite() && f == f.trunc() && f.abs() < 1e16 {
            out.push_str(&format!("{f:.1}"));
        } else {
            out.push_str(&format!("{f:?}"));
        }
    } else {
        out.push_str(&n.to_string());
    }
}

fn dump(v: &Value, o: &DumpOptions, level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => dump_number(n, out),
        Value::String(s) => dump_str(s, o.ensure_ascii, out),
        Value::Array(a) => {
            if a.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, level + 1);
                dump(x, o, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(m) => {
            if m.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            if o.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, level + 1);
                dump_str(k, o.ensure_ascii, out);
                out.push_str(&o.key_sep);
                dump(x, o, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
    }
}

// ---------------------------------------------------------------------------------------------
// strftime_now
// ---------------------------------------------------------------------------------------------

/// Broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CivilTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 0 = Monday.
    pub weekday: u32,
    /// 1-based day of the year.
    pub yday: u32,
}

/// UTC civil time for seconds since the Unix epoch.
pub fn civil_from_unix(secs: i64) -> CivilTime {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Days since 1970-01-01 to (y, m, d), proleptic Gregorian (era-based algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(month - 1) as usize] + day + u32::from(leap && month > 2);
    CivilTime {
        year,
        month,
        day,
        hour: (rem / 3600) as u32,
        minute: (rem % 3600 / 60) as u32,
        second: (rem % 60) as u32,
        weekday: ((days + 3).rem_euclid(7)) as u32,
        yday,
    }
}

fn now_utc() -> CivilTime {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    civil_from_unix(secs)
}

/// A subset of C `strftime` (UTC): `%Y %y %m %d %e %H %I %M %S %p %B %b %h %A %a %j %F %T %D %%`,
/// with the glibc `-` flag (`%-d`) to drop padding.
pub fn strftime(fmt: &str, t: CivilTime) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut pad = true;
        let mut spec = chars.next();
        if spec == Some('-') {
            pad = false;
            spec = chars.next();
        }
        let num = |v: u32, width: usize| {
            if pad {
                format!("{v:0width$}")
            } else {
                v.to_string()
            }
        };
        let hour12 = if t.hour.is_multiple_of(12) {
            12
        } else {
            t.hour % 12
        };
        match spec {
            Some('Y') => out.push_str(&t.year.to_string()),
            Some('y') => out.push_str(&num(t.year.rem_euclid(100) as u32, 2)),
            Some('m') => out.push_str(&num(t.month, 2)),
            Some('d') => out.push_str(&num(t.day, 2)),
            Some('e') => out.push_str(&if pad {
                format!("{:2}", t.day)
            } else {
                t.day.to_string()
            }),
            Some('H') => out.push_str(&num(t.hour, 2)),
            Some('I') => out.push_str(&num(hour12, 2)),
            Some('M') => out.push_str(&num(t.minute, 2)),
            Some('S') => out.push_str(&num(t.second, 2)),
            Some('p') => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(MONTHS[(t.month - 1) as usize]),
            Some('b') | Some('h') => out.push_str(&MONTHS[(t.month - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[t.weekday as usize]),
            Some('a') => out.push_str(&DAYS[t.weekday as usize][..3]),
            Some('j') => out.push_str(&num(t.yday, 3)),
            Some('F') => out.push_str(&format!("{}-{:02}-{:02}", t.year, t.month, t.day)),
            Some('T') => out.push_str(&format!("{:02}:{:02}:{:02}", t.hour, t.minute, t.second)),
            Some('D') => out.push_str(&format!(
                "{:02}/{:02}/{:02}",
                t.month,
                t.day,
                t.year.rem_euclid(100)
            )),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if !pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}
