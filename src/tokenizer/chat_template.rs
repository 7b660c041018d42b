//! Chat templates: the Jinja template a model ships, rendered the way transformers does
//! (jinja2 with `trim_blocks`, `lstrip_blocks`, `raise_exception`, `strftime_now`, Python string
//! methods, and a `tojson` that writes like Python's `json.dumps`).

use anyhow::{Result, anyhow};
use minijinja::value::Kwargs;
use minijinja::{Environment, Error as JinjaError, ErrorKind as JinjaErrorKind, Value as JValue};
use serde_json::Value;

use super::SpecialTokens;

/// Name of the compiled template inside the Jinja environment.
const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template and where it came from (for error messages).
pub struct ChatTemplate {
    env: Environment<'static>,
    origin: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatTemplate({})", self.origin)
    }
}

impl Clone for ChatTemplate {
    fn clone(&self) -> Self {
        Self {
            env: self.env.clone(),
            origin: self.origin.clone(),
        }
    }
}

impl ChatTemplate {
    /// Compiles `template`; `origin` names the file it came from.
    pub fn new(template: &str, origin: &str) -> Result<Self> {
        let env = build_env(template).map_err(|e| {
            anyhow!(
                "{origin}: invalid chat template: {}",
                describe_jinja_error(&e)
            )
        })?;
        Ok(Self {
            env,
            origin: origin.to_string(),
        })
    }

    /// Renders the template for `messages`, like transformers' `apply_chat_template(tokenize=False)`.
    pub fn render(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        tools: Option<&Value>,
        special: &SpecialTokens,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| anyhow!("{}: {}", self.origin, describe_jinja_error(&e)))?;
        let opt = |s: &Option<String>| match s {
            Some(s) => JValue::from(s.as_str()),
            None => JValue::from(()),
        };
        let ctx = minijinja::context! {
            messages => JValue::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            tools => match tools { Some(t) => JValue::from_serialize(t), None => JValue::from(()) },
            documents => JValue::from(()),
            bos_token => opt(&special.bos_token),
            eos_token => opt(&special.eos_token),
            pad_token => opt(&special.pad_token),
            unk_token => opt(&special.unk_token),
        };
        tmpl.render(ctx).map_err(|e| {
            anyhow!(
                "{}: cannot render chat template: {}",
                self.origin,
                describe_jinja_error(&e)
            )
        })
    }
}

/// `strftime_now(fmt)`: the current UTC time, formatted by jiff's strftime (which knows the
/// glibc `-` flag templates use, as in `%-d`).
pub fn strftime_now(fmt: &str) -> std::result::Result<String, JinjaError> {
    let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    jiff::fmt::strtime::format(fmt, &now).map_err(|e| {
        JinjaError::new(
            JinjaErrorKind::InvalidOperation,
            format!("strftime_now(\"{fmt}\"): {e}"),
        )
    })
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
    env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
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
