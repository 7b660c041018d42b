//! The one error type for spec problems: it always says which file (and line, when known),
//! which key, what is wrong, and what would be right.

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// The file the problem is in; empty for `--set` values from the command line.
    pub file: PathBuf,
    /// 1-based line, 0 when not known.
    pub line: usize,
    /// The dotted key the problem is about, if any.
    pub key: Option<String>,
    pub message: String,
    /// What would be right ("did you mean `learning_rate`?").
    pub hint: Option<String>,
}

impl ConfigError {
    pub fn at(file: &Path, line: usize, message: String) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            line,
            key: None,
            message,
            hint: None,
        }
    }

    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.file.as_os_str().is_empty() {
            write!(f, "--set")?;
        } else {
            write!(f, "{}", self.file.display())?;
        }
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        write!(f, ": ")?;
        if let Some(k) = &self.key {
            write!(f, "`{k}`: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " ({h})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}
