//! Answers for comparison: greedy generations for test examples (and extra prompts), scored
//! against the reference answer with a task metric. Written as `generations.jsonl` in a run
//! folder (fine-tuned) or `base_generations.jsonl` in the experiment folder (base model).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{GenerateConfig, generate};
use crate::data::jsonl::{Example, read_split};
use crate::model::llama::Llama;
use crate::tokenizer::Tokenizer;

/// One prompt to answer, with the reference answer when the data has one.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    /// What the user asked (shown in reports).
    pub prompt: String,
    /// The full model input (chat template applied).
    pub input: String,
    pub reference: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub prompt: String,
    pub reference: Option<String>,
    pub output: String,
    pub seconds: f64,
    pub tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correct: Option<bool>,
}

/// The first `n` examples of a split (chat or completion records) plus free `prompts`.
pub fn questions(
    split: Option<&Path>,
    n: usize,
    prompts: &[String],
    tok: &Tokenizer,
) -> Result<Vec<Question>> {
    let mut out = Vec::new();
    if n > 0 {
        let Some(path) = split else {
            bail!("eval.generate asks for {n} test examples but the data folder has no test.jsonl");
        };
        let (_, examples) = read_split(path)?;
        for ex in examples.into_iter().take(n) {
            let (messages, reference) = match ex {
                Example::Chat { mut messages, .. } => {
                    let last = messages.pop().context("empty chat record")?;
                    if last["role"] != "assistant" {
                        bail!(
                            "{}: a test record for generation must end with the assistant's answer",
                            path.display()
                        );
                    }
                    (messages, last["content"].as_str().map(String::from))
                }
                Example::Completion { prompt, completion } => (
                    vec![json!({"role": "user", "content": prompt})],
                    Some(completion),
                ),
                Example::Text(_) => bail!(
                    "{}: eval.generate needs chat or completion records to take prompts from",
                    path.display()
                ),
            };
            let prompt = messages
                .iter()
                .rev()
                .find(|m| m["role"] == "user")
                .and_then(|m| m["content"].as_str())
                .unwrap_or("")
                .to_string();
            let input = tok.apply_chat_template(&messages, true, None)?;
            out.push(Question {
                prompt,
                input,
                reference,
            });
        }
    }
    for p in prompts {
        let input = match tok.chat_template() {
            Some(_) => {
                tok.apply_chat_template(&[json!({"role": "user", "content": p})], true, None)?
            }
            None => p.clone(),
        };
        out.push(Question {
            prompt: p.clone(),
            input,
            reference: None,
        });
    }
    Ok(out)
}

/// Greedy answers to every question, stopping at EOS.
pub fn answer(
    model: &Llama,
    tok: &Tokenizer,
    questions: &[Question],
    max_tokens: usize,
) -> Result<Vec<Answer>> {
    let mut config = GenerateConfig {
        max_new_tokens: max_tokens,
        ..Default::default()
    }
    .with_model_eos(&model.config);
    for id in tok.eos_token_ids() {
        if !config.eos_token_ids.contains(&id) {
            config.eos_token_ids.push(id);
        }
    }
    let decode = |ids: &[u32]| tok.decode(ids, true);
    let mut out = Vec::new();
    for q in questions {
        let ids = tok.try_encode(&q.input, false)?;
        let t0 = Instant::now();
        let g = generate(model, &ids, &config, Some(&decode), &mut |_| true)?;
        let output = match g.text {
            Some(t) => t,
            None => decode(&g.tokens)?,
        }
        .trim()
        .to_string();
        out.push(Answer {
            prompt: q.prompt.clone(),
            reference: q.reference.clone(),
            output,
            seconds: t0.elapsed().as_secs_f64(),
            tokens: g.tokens.len(),
            correct: None,
        });
    }
    Ok(out)
}

/// A task metric on generated answers.
#[derive(Debug, Clone)]
pub enum TaskMetric {
    /// Equal after trimming, lower-casing and dropping a final period.
    ExactMatch,
    /// The reference appears in the output (case-insensitive).
    Contains,
    /// The pattern's first capture group (or whole match) equals the reference (as exact_match).
    Regex(regex::Regex),
}

impl TaskMetric {
    /// From the spec's `eval.metric` and `eval.regex`; `none` gives `None`.
    pub fn from_spec(name: &str, pattern: &str) -> Result<Option<TaskMetric>> {
        Ok(match name {
            "exact_match" => Some(TaskMetric::ExactMatch),
            "contains" => Some(TaskMetric::Contains),
            "regex" => {
                if pattern.is_empty() {
                    bail!("eval.metric: regex needs eval.regex, e.g. \"Diagnosis: (.*)\"");
                }
                Some(TaskMetric::Regex(
                    regex::Regex::new(pattern)
                        .with_context(|| format!("eval.regex `{pattern}`"))?,
                ))
            }
            _ => None,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            TaskMetric::ExactMatch => "exact_match",
            TaskMetric::Contains => "contains",
            TaskMetric::Regex(_) => "regex",
        }
    }

    pub fn score(&self, output: &str, reference: &str) -> bool {
        let norm = |s: &str| s.trim().trim_end_matches('.').trim().to_lowercase();
        match self {
            TaskMetric::ExactMatch => norm(output) == norm(reference),
            TaskMetric::Contains => output
                .to_lowercase()
                .contains(&reference.trim().to_lowercase()),
            TaskMetric::Regex(re) => re
                .captures(output)
                .map(|c| {
                    c.get(1)
                        .or_else(|| c.get(0))
                        .map_or("", |m| m.as_str())
                        .to_string()
                })
                .is_some_and(|got| norm(&got) == norm(reference)),
        }
    }

    /// Marks each answer that has a reference and returns the fraction correct among those.
    pub fn apply(&self, answers: &mut [Answer]) -> Option<f64> {
        let mut n = 0;
        let mut ok = 0;
        for a in answers.iter_mut() {
            if let Some(r) = &a.reference {
                let c = self.score(&a.output, r);
                a.correct = Some(c);
                n += 1;
                ok += c as usize;
            }
        }
        (n > 0).then(|| ok as f64 / n as f64)
    }
}

/// Writes answers as JSON lines.
pub fn write(path: &Path, answers: &[Answer]) -> Result<()> {
    let text: String = answers
        .iter()
        .map(|a| serde_json::to_string(a).map(|s| s + "\n"))
        .collect::<Result<_, _>>()?;
    crate::files::write_atomic(path, text.as_bytes())
}

/// Reads answers written by [`write`].
pub fn read(path: &Path) -> Result<Vec<Answer>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("{}: bad line", path.display())))
        .collect()
}

/// The task score recorded next to base answers.
pub fn write_score(path: &Path, metric: &TaskMetric, score: Option<f64>) -> Result<()> {
    let v: Value = json!({"task_metric": metric.name(), "task_score": score});
    crate::files::write_atomic(path, serde_json::to_string_pretty(&v)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_score_as_documented() {
        assert!(TaskMetric::ExactMatch.score(" Influenza. ", "influenza"));
        assert!(!TaskMetric::ExactMatch.score("It is influenza", "Influenza"));
        assert!(TaskMetric::Contains.score("It is Influenza", "influenza"));
        let re = TaskMetric::from_spec("regex", r"diagnosis: (\w+)")
            .unwrap()
            .unwrap();
        assert!(re.score("My diagnosis: Asthma today", "asthma"));
        assert!(!re.score("no idea", "asthma"));
        let mut answers = vec![
            Answer {
                prompt: "p".into(),
                reference: Some("A".into()),
                output: "a".into(),
                seconds: 0.0,
                tokens: 1,
                correct: None,
            },
            Answer {
                prompt: "q".into(),
                reference: Some("B".into()),
                output: "c".into(),
                seconds: 0.0,
                tokens: 1,
                correct: None,
            },
            Answer {
                prompt: "r".into(),
                reference: None,
                output: "c".into(),
                seconds: 0.0,
                tokens: 1,
                correct: None,
            },
        ];
        assert_eq!(TaskMetric::ExactMatch.apply(&mut answers), Some(0.5));
        assert_eq!(answers[2].correct, None);
    }
}
