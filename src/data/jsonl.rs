//! mlx-lm's three JSONL formats, detected per file from its first record:
//! `{"text"}`, `{"messages": [...]}` (chat, optional `tools`), `{"prompt", "completion"}`.
//! Every bad line fails with `file:line` and what is wrong.

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use serde_json::Value;

/// One training example as read from a JSONL line.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    Text(String),
    Chat {
        messages: Vec<Value>,
        tools: Option<Value>,
    },
    Completion {
        prompt: String,
        completion: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Chat,
    Completion,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Text => "text ({\"text\": ...})",
            Format::Chat => "chat ({\"messages\": [...]})",
            Format::Completion => "completion ({\"prompt\": ..., \"completion\": ...})",
        }
    }
}

/// Reads a JSONL split. Blank lines are skipped; an empty file is an error.
pub fn read_split(path: &Path) -> Result<(Format, Vec<Example>)> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
    let mut format = None;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let v: Value =
            serde_json::from_str(line).map_err(|e| anyhow!("{at}: not valid JSON: {e}"))?;
        let Some(obj) = v.as_object() else {
            bail!("{at}: expected a JSON object, found {}", kind(&v));
        };
        let this = if obj.contains_key("messages") {
            Format::Chat
        } else if obj.contains_key("prompt") || obj.contains_key("completion") {
            Format::Completion
        } else if obj.contains_key("text") {
            Format::Text
        } else {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            bail!(
                "{at}: no `text`, `messages` or `prompt`/`completion` key (found {}); \
                 each line must be one of {}, {}, {}",
                if keys.is_empty() {
                    "none".into()
                } else {
                    keys.join(", ")
                },
                Format::Text.name(),
                Format::Chat.name(),
                Format::Completion.name()
            );
        };
        let expected = *format.get_or_insert(this);
        if this != expected {
            bail!(
                "{at}: this line is {} but the file's first record is {}; one file holds one format",
                this.name(),
                expected.name()
            );
        }
        out.push(parse(obj, this).map_err(|e| anyhow!("{at}: {e}"))?);
    }
    match format {
        Some(f) => Ok((f, out)),
        None => bail!("{}: the file has no examples", path.display()),
    }
}

fn parse(obj: &serde_json::Map<String, Value>, format: Format) -> Result<Example> {
    let string = |key: &str| -> Result<String> {
        match obj.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => bail!("`{key}` must be a string, found {}", kind(other)),
            None => bail!("missing `{key}`"),
        }
    };
    Ok(match format {
        Format::Text => Example::Text(string("text")?),
        Format::Completion => Example::Completion {
            prompt: string("prompt")?,
            completion: string("completion")?,
        },
        Format::Chat => {
            let Some(Value::Array(messages)) = obj.get("messages") else {
                bail!("`messages` must be a list of {{\"role\", \"content\"}} objects");
            };
            if messages.is_empty() {
                bail!("`messages` is empty");
            }
            for (j, m) in messages.iter().enumerate() {
                let role = m.get("role").and_then(Value::as_str);
                match role {
                    Some("system" | "user" | "assistant" | "tool") => {}
                    Some(r) => bail!(
                        "message {}: unknown role `{r}` (system, user, assistant or tool)",
                        j + 1
                    ),
                    None => bail!("message {}: missing `role`", j + 1),
                }
                if m.get("content").is_none() && m.get("tool_calls").is_none() {
                    bail!("message {}: missing `content`", j + 1);
                }
            }
            Example::Chat {
                messages: messages.clone(),
                tools: obj.get("tools").cloned(),
            }
        }
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("train.jsonl");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn detects_each_format() {
        let (_d, p) = file("{\"text\": \"a\"}\n\n{\"text\": \"b\"}\n");
        assert_eq!(read_split(&p).unwrap().0, Format::Text);
        let (_d, p) = file("{\"prompt\": \"q\", \"completion\": \"a\"}\n");
        assert_eq!(read_split(&p).unwrap().0, Format::Completion);
        let (_d, p) = file("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n");
        assert_eq!(read_split(&p).unwrap().0, Format::Chat);
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let (_d, p) = file("{\"text\": \"a\"}\n{\"msgs\": []}\n");
        let e = read_split(&p).unwrap_err().to_string();
        assert!(
            e.contains("train.jsonl:2")
                && e.contains("no `text`, `messages`")
                && e.contains("msgs"),
            "{e}"
        );
        let (_d, p) = file("{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}\n");
        let e = read_split(&p).unwrap_err().to_string();
        assert!(
            e.contains("train.jsonl:1") && e.contains("unknown role `bot`"),
            "{e}"
        );
        let (_d, p) = file("{\"text\": \"a\"}\n{\"prompt\": \"q\", \"completion\": \"a\"}\n");
        assert!(
            read_split(&p)
                .unwrap_err()
                .to_string()
                .contains("one file holds one format")
        );
        let (_d, p) = file("{\"text\": 5}\n");
        assert!(
            read_split(&p)
                .unwrap_err()
                .to_string()
                .contains("`text` must be a string")
        );
        let (_d, p) = file("{\"text\": \"a\"\n");
        assert!(
            read_split(&p)
                .unwrap_err()
                .to_string()
                .contains("train.jsonl:1: not valid JSON")
        );
        let (_d, p) = file("\n\n");
        assert!(
            read_split(&p)
                .unwrap_err()
                .to_string()
                .contains("has no examples")
        );
    }
}
