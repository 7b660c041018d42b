//! A YAML or TOML file read into an ordered tree that remembers the line of every node, so
//! that every later error (unknown key, wrong type, bad schedule) can name `file:line`.

use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use super::error::ConfigError;

/// A parsed value with its source line (1-based; 0 when unknown).
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub line: usize,
}

/// The value part of a [`Node`]. Maps keep the file's key order.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

impl Node {
    pub fn new(value: Value, line: usize) -> Self {
        Node { value, line }
    }

    /// Converts to JSON, the form the rest of tuna merges and hashes.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(J::Number)
                .unwrap_or(J::Null),
            Value::Str(s) => J::String(s.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// Builds a node tree (all lines unknown) from JSON, for values given on the command line.
    pub fn from_json(v: &serde_json::Value) -> Node {
        use serde_json::Value as J;
        let value = match v {
            J::Null => Value::Null,
            J::Bool(b) => Value::Bool(*b),
            J::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            J::String(s) => Value::Str(s.clone()),
            J::Array(a) => Value::Seq(a.iter().map(Node::from_json).collect()),
            J::Object(o) => Value::Map(
                o.iter()
                    .map(|(k, v)| (k.clone(), Node::from_json(v)))
                    .collect(),
            ),
        };
        Node::new(value, 0)
    }

    /// Entries of a map node, or `None` for any other kind.
    pub fn as_map(&self) -> Option<&[(String, Node)]> {
        match &self.value {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// Looks a key up in a map node.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// A short name for the kind of value, for error messages.
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// A whole file: its path and root node.
#[derive(Debug, Clone)]
pub struct Doc {
    pub path: PathBuf,
    pub root: Node,
}

impl Doc {
    /// Reads a `.yaml`/`.yml` or `.toml` file; the extension decides the syntax.
    pub fn load(path: &Path) -> Result<Doc, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::at(path, 0, format!("cannot read the file: {e}"))
                .hint("check the path; relative paths are resolved from the file that names them")
        })?;
        Self::parse(path, &text)
    }

    /// Parses text as the syntax that `path`'s extension names.
    pub fn parse(path: &Path, text: &str) -> Result<Doc, ConfigError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        let root = match ext.as_str() {
            "toml" => parse_toml(path, text)?,
            "yaml" | "yml" => parse_yaml(path, text)?,
            other => {
                return Err(
                    ConfigError::at(path, 0, format!("unknown file type `.{other}`"))
                        .hint("experiments are .yaml files; recipes are .yaml, .yml or .toml"),
                );
            }
        };
        if root.value == Value::Null {
            return Err(ConfigError::at(path, 1, "the file is empty".to_string()));
        }
        if root.as_map().is_none() {
            return Err(ConfigError::at(
                path,
                root.line.max(1),
                format!(
                    "the top level must be a mapping of keys, found {}",
                    root.kind()
                ),
            ));
        }
        Ok(Doc {
            path: path.to_path_buf(),
            root,
        })
    }
}

fn parse_yaml(path: &Path, text: &str) -> Result<Node, ConfigError> {
    if text.trim().is_empty() {
        return Ok(Node::new(Value::Null, 1));
    }
    let root: NodeDe<YamlSpans> = serde_saphyr::from_str(text).map_err(|e| {
        let msg = e.to_string();
        let line = yaml_error_line(&msg);
        ConfigError::at(path, line, format!("invalid YAML: {}", first_line(&msg)))
    })?;
    let mut node = root.node;
    if node.line == 0 {
        node.line = 1;
    }
    Ok(node)
}

fn parse_toml(path: &Path, text: &str) -> Result<Node, ConfigError> {
    let root: NodeDe<TomlSpans> = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| byte_to_line(text, s.start)).unwrap_or(0);
        ConfigError::at(
            path,
            line,
            format!("invalid TOML: {}", first_line(e.message())),
        )
    })?;
    let mut node = root.node;
    bytes_to_lines(&mut node, text);
    node.line = 1;
    Ok(node)
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

/// serde-saphyr puts "line N" in its messages; pull it out so our error names it uniformly.
fn yaml_error_line(msg: &str) -> usize {
    let lower = msg.to_ascii_lowercase();
    lower
        .find("line ")
        .and_then(|i| {
            lower[i + 5..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|d| d.parse().ok())
        })
        .unwrap_or(0)
}

fn byte_to_line(text: &str, byte: usize) -> usize {
    text.as_bytes()[..byte.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// TOML spans are byte offsets; they are stored in `line` while parsing and converted here.
fn bytes_to_lines(node: &mut Node, text: &str) {
    node.line = byte_to_line(text, node.line);
    match &mut node.value {
        Value::Seq(items) => items.iter_mut().for_each(|n| bytes_to_lines(n, text)),
        Value::Map(entries) => entries
            .iter_mut()
            .for_each(|(_, n)| bytes_to_lines(n, text)),
        _ => {}
    }
}

/// How one syntax reports where a value came from.
trait Spans: Sized {
    /// The next key and the line (TOML: byte offset) it stands on.
    fn next_key<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Option<(String, usize)>, A::Error>;
    fn next_value<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Node, A::Error>;
    fn next_element<'de, A: SeqAccess<'de>>(seq: &mut A) -> Result<Option<Node>, A::Error>;
}

struct YamlSpans;
struct TomlSpans;

impl Spans for YamlSpans {
    fn next_key<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Option<(String, usize)>, A::Error> {
        let k: Option<serde_saphyr::Spanned<KeyDe>> = map.next_key()?;
        Ok(k.map(|k| (k.value.0, k.referenced.line() as usize)))
    }
    fn next_value<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Node, A::Error> {
        let s: serde_saphyr::Spanned<NodeDe<YamlSpans>> = map.next_value()?;
        let mut node = s.value.node;
        node.line = s.referenced.line() as usize;
        Ok(node)
    }
    fn next_element<'de, A: SeqAccess<'de>>(seq: &mut A) -> Result<Option<Node>, A::Error> {
        let s: Option<serde_saphyr::Spanned<NodeDe<YamlSpans>>> = seq.next_element()?;
        Ok(s.map(|s| {
            let mut node = s.value.node;
            node.line = s.referenced.line() as usize;
            node
        }))
    }
}

impl Spans for TomlSpans {
    fn next_key<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Option<(String, usize)>, A::Error> {
        let k: Option<toml::Spanned<KeyDe>> = map.next_key()?;
        Ok(k.map(|k| {
            let start = k.span().start;
            (k.into_inner().0, start)
        }))
    }
    fn next_value<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Node, A::Error> {
        let s: toml::Spanned<NodeDe<TomlSpans>> = map.next_value()?;
        let start = s.span().start;
        let mut node = s.into_inner().node;
        node.line = start;
        Ok(node)
    }
    fn next_element<'de, A: SeqAccess<'de>>(seq: &mut A) -> Result<Option<Node>, A::Error> {
        let s: Option<toml::Spanned<NodeDe<TomlSpans>>> = seq.next_element()?;
        Ok(s.map(|s| {
            let start = s.span().start;
            let mut node = s.into_inner().node;
            node.line = start;
            node
        }))
    }
}

struct NodeDe<S> {
    node: Node,
    _s: PhantomData<S>,
}

impl<'de, S: Spans> Deserialize<'de> for NodeDe<S> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor::<S>(PhantomData))
    }
}

struct NodeVisitor<S>(PhantomData<S>);

impl<S> NodeVisitor<S> {
    fn done<E>(v: Value) -> Result<NodeDe<S>, E> {
        Ok(NodeDe {
            node: Node::new(v, 0),
            _s: PhantomData,
        })
    }
}

impl<'de, S: Spans> Visitor<'de> for NodeVisitor<S> {
    type Value = NodeDe<S>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a YAML or TOML value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Self::done(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Self::done(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        NodeDe::<S>::deserialize(d)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Self::done(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Self::done(Value::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        match i64::try_from(v) {
            Ok(i) => Self::done(Value::Int(i)),
            Err(_) => Self::done(Value::Float(v as f64)),
        }
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Self::done(Value::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Self::done(Value::Str(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Self::done(Value::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(n) = S::next_element(&mut seq)? {
            items.push(n);
        }
        Self::done(Value::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries: Vec<(String, Node)> = Vec::new();
        while let Some((key, key_line)) = S::next_key(&mut map)? {
            let mut value = S::next_value(&mut map)?;
            // Errors point at the key's line: a block mapping's value starts a line later.
            if key_line > 0 {
                value.line = key_line;
            }
            if entries.iter().any(|(k, _)| *k == key) {
                return Err(de::Error::custom(format!("duplicate key `{key}`")));
            }
            entries.push((key, value));
        }
        Self::done(Value::Map(entries))
    }
}

/// Map keys: strings, or scalars written as keys (`8: x`) turned into their text.
struct KeyDe(String);

impl<'de> Deserialize<'de> for KeyDe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyDe;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyDe, E> {
                Ok(KeyDe(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyDe, E> {
                Ok(KeyDe(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyDe, E> {
                Ok(KeyDe(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeyDe, E> {
                Ok(KeyDe(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_lines_are_recorded() {
        let doc = Doc::parse(
            Path::new("x.yaml"),
            "name: a\ntrain:\n  iters: 5\n  learning_rate: 1e-5\n",
        )
        .unwrap();
        let train = doc.root.get("train").unwrap();
        assert_eq!(train.get("iters").unwrap().line, 3);
        assert_eq!(train.get("learning_rate").unwrap().line, 4);
        assert_eq!(
            train.get("learning_rate").unwrap().value,
            Value::Float(1e-5)
        );
    }

    #[test]
    fn toml_lines_are_recorded() {
        let doc = Doc::parse(
            Path::new("x.toml"),
            "name = \"a\"\n\n[lora]\nrank = 4\nkeys = [\"q_proj\"]\n",
        )
        .unwrap();
        let lora = doc.root.get("lora").unwrap();
        assert_eq!(lora.get("rank").unwrap().line, 4);
        assert_eq!(lora.get("keys").unwrap().line, 5);
    }

    #[test]
    fn yaml_keeps_key_order() {
        let doc = Doc::parse(Path::new("x.yaml"), "b: 1\na: 2\nc: 3\n").unwrap();
        let keys: Vec<_> = doc
            .root
            .as_map()
            .unwrap()
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(keys, ["b", "a", "c"]);
    }
}
