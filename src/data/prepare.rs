//! `tuna data prepare`: a CSV (seed 000's `label,text` shape, or any columns) becomes
//! `train/valid/test.jsonl`, deterministically for a given seed.
//!
//! Templates name columns in braces: `--prompt-template "Symptoms: {text}"`. With `--system`
//! the records are chat (`messages`), otherwise completion (`prompt`, `completion`) records.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;

use super::dataset::permutation;

#[derive(Debug, Clone)]
pub struct PrepareArgs {
    pub csv: PathBuf,
    pub prompt_template: String,
    pub completion_template: String,
    pub system: Option<String>,
    /// Percentages for train/valid/test, summing to 100.
    pub split: [u32; 3],
    pub seed: u64,
    pub out: PathBuf,
}

/// Parses `80/10/10`.
pub fn parse_split(s: &str) -> Result<[u32; 3]> {
    let parts: Vec<&str> = s.split('/').collect();
    let bad = || {
        anyhow!(
            "--split `{s}`: expected three whole percentages train/valid/test adding up to 100, like 80/10/10"
        )
    };
    if parts.len() != 3 {
        return Err(bad());
    }
    let mut out = [0u32; 3];
    for (o, p) in out.iter_mut().zip(&parts) {
        *o = p.trim().parse().map_err(|_| bad())?;
    }
    if out.iter().sum::<u32>() != 100 || out[0] == 0 || out[1] == 0 {
        return Err(bad());
    }
    Ok(out)
}

/// Fills `{column}` placeholders from a row; unknown names are an error listing the columns.
fn fill(template: &str, header: &[String], row: &csv::StringRecord, flag: &str) -> Result<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| anyhow!("{flag}: `{{` without a closing `}}` in `{template}`"))?;
        let name = &after[..close];
        let col = header.iter().position(|h| h == name).ok_or_else(|| {
            anyhow!(
                "{flag}: `{{{name}}}` is not a column of the CSV (columns: {})",
                header.join(", ")
            )
        })?;
        out.push_str(row.get(col).unwrap_or(""));
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Writes the three splits; returns their sizes.
pub fn prepare(args: &PrepareArgs) -> Result<[usize; 3]> {
    let mut reader = csv::Reader::from_path(&args.csv)
        .with_context(|| format!("cannot read CSV {}", args.csv.display()))?;
    let header: Vec<String> = reader
        .headers()
        .with_context(|| format!("{}: no header row", args.csv.display()))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let mut records = Vec::new();
    for (i, rec) in reader.records().enumerate() {
        let rec =
            rec.with_context(|| format!("{}:{}: malformed CSV row", args.csv.display(), i + 2))?;
        let prompt = fill(&args.prompt_template, &header, &rec, "--prompt-template")?;
        let completion = fill(
            &args.completion_template,
            &header,
            &rec,
            "--completion-template",
        )?;
        if completion.trim().is_empty() {
            bail!("{}:{}: the completion is empty", args.csv.display(), i + 2);
        }
        let value = match &args.system {
            Some(system) => json!({"messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": completion},
            ]}),
            None => json!({"prompt": prompt, "completion": completion}),
        };
        records.push(value);
    }
    let n = records.len();
    if n < 3 {
        bail!(
            "{}: {n} data rows; need at least 3 to make three splits",
            args.csv.display()
        );
    }
    let order = permutation(n, args.seed);
    let n_train = (n * args.split[0] as usize / 100).max(1);
    let n_valid = (n * args.split[1] as usize / 100).max(1).min(n - n_train);
    let bounds = [0, n_train, n_train + n_valid, n];
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut sizes = [0; 3];
    for (k, name) in ["train", "valid", "test"].iter().enumerate() {
        let lines: Vec<String> = order[bounds[k]..bounds[k + 1]]
            .iter()
            .map(|&i| records[i].to_string())
            .collect();
        sizes[k] = lines.len();
        if lines.is_empty() {
            continue;
        }
        write(
            &args.out.join(format!("{name}.jsonl")),
            &(lines.join("\n") + "\n"),
        )?;
    }
    Ok(sizes)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_becomes_deterministic_splits() {
        let d = tempfile::tempdir().unwrap();
        let csv = d.path().join("x.csv");
        let mut text = "label,text\n".to_string();
        for i in 0..20 {
            text.push_str(&format!("L{i},\"symptom {i}, more\"\n"));
        }
        std::fs::write(&csv, text).unwrap();
        let args = PrepareArgs {
            csv,
            prompt_template: "Symptoms: {text}".into(),
            completion_template: "Diagnosis: {label}".into(),
            system: None,
            split: parse_split("80/10/10").unwrap(),
            seed: 3,
            out: d.path().join("a"),
        };
        assert_eq!(prepare(&args).unwrap(), [16, 2, 2]);
        prepare(&PrepareArgs {
            out: d.path().join("b"),
            ..args.clone()
        })
        .unwrap();
        for s in ["train", "valid", "test"] {
            let a = std::fs::read_to_string(d.path().join(format!("a/{s}.jsonl"))).unwrap();
            let b = std::fs::read_to_string(d.path().join(format!("b/{s}.jsonl"))).unwrap();
            assert_eq!(a, b);
        }
        let first = std::fs::read_to_string(d.path().join("a/train.jsonl")).unwrap();
        let v: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
        let p = v["prompt"].as_str().unwrap();
        let i: String = p
            .trim_start_matches("Symptoms: symptom ")
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        assert_eq!(v["completion"], format!("Diagnosis: L{i}"));
        let e = prepare(&PrepareArgs {
            prompt_template: "{symptoms}".into(),
            ..args.clone()
        })
        .unwrap_err();
        assert!(
            e.to_string().contains("`{symptoms}` is not a column")
                && e.to_string().contains("label, text"),
            "{e}"
        );
        assert!(parse_split("80/20").is_err() && parse_split("80/10/5").is_err());
    }
}
