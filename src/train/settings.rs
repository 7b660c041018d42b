//! The typed view of a resolved run config that the trainer reads. The catalog in
//! `config/keys.rs` has already checked every value, so reading cannot fail here.

use serde_json::Value as J;

use crate::config::grid::lr_schedule;
use crate::model::lora::LoraConfig;
use crate::optim::schedule::LrSchedule;

#[derive(Debug, Clone)]
pub struct TrainSettings {
    pub model: String,
    pub data: String,
    pub device: String,
    pub dtype: String,
    pub iters: u64,
    pub batch_size: usize,
    pub schedule: LrSchedule,
    pub optimizer: String,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub grad_clip: Option<f64>,
    pub grad_accumulation: u64,
    pub grad_checkpoint: bool,
    pub max_seq_length: usize,
    pub mask_prompt: bool,
    pub steps_per_report: u64,
    pub steps_per_eval: u64,
    pub val_batches: i64,
    pub save_every: u64,
    pub seed: u64,
    pub lora: LoraConfig,
    pub test: bool,
    pub test_batches: i64,
    pub generate: usize,
    pub prompts: Vec<String>,
    pub max_tokens: usize,
    pub metric: String,
    pub regex: String,
}

impl TrainSettings {
    pub fn from_config(c: &J) -> anyhow::Result<Self> {
        let t = &c["train"];
        let l = &c["lora"];
        let s = |v: &J| v.as_str().unwrap_or_default().to_string();
        let u = |v: &J, d: u64| v.as_u64().unwrap_or(d);
        let f = |v: &J, d: f64| v.as_f64().unwrap_or(d);
        Ok(TrainSettings {
            model: s(&c["model"]),
            data: s(&c["data"]),
            device: c["device"].as_str().unwrap_or("auto").to_string(),
            dtype: c["dtype"].as_str().unwrap_or("auto").to_string(),
            iters: u(&t["iters"], 1000),
            batch_size: u(&t["batch_size"], 4) as usize,
            schedule: lr_schedule(c).map_err(|e| anyhow::anyhow!("train.lr_schedule: {e}"))?,
            optimizer: t["optimizer"].as_str().unwrap_or("adam").to_string(),
            beta1: f(&t["beta1"], 0.9),
            beta2: f(&t["beta2"], 0.999),
            eps: f(&t["eps"], 1e-8),
            weight_decay: f(&t["weight_decay"], 0.0),
            grad_clip: t["grad_clip"].as_f64(),
            grad_accumulation: u(&t["grad_accumulation"], 1),
            grad_checkpoint: t["grad_checkpoint"].as_bool().unwrap_or(false),
            max_seq_length: u(&t["max_seq_length"], 2048) as usize,
            mask_prompt: t["mask_prompt"].as_bool().unwrap_or(false),
            steps_per_report: u(&t["steps_per_report"], 10),
            steps_per_eval: u(&t["steps_per_eval"], 200),
            val_batches: t["val_batches"].as_i64().unwrap_or(25),
            save_every: u(&t["save_every"], 100),
            seed: u(&t["seed"], 0),
            lora: LoraConfig {
                rank: u(&l["rank"], 8) as usize,
                scale: f(&l["scale"], 20.0),
                dropout: f(&l["dropout"], 0.0),
                keys: l["keys"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|k| k.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_else(|| vec!["q_proj".into(), "v_proj".into()]),
                num_layers: l["num_layers"].as_i64().unwrap_or(16),
            },
            test: c["eval"]["test"].as_bool().unwrap_or(true),
            test_batches: c["eval"]["test_batches"].as_i64().unwrap_or(-1),
            generate: u(&c["eval"]["generate"], 0) as usize,
            prompts: c["eval"]["prompts"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
            max_tokens: u(&c["eval"]["max_tokens"], 64) as usize,
            metric: c["eval"]["metric"].as_str().unwrap_or("none").to_string(),
            regex: c["eval"]["regex"].as_str().unwrap_or("").to_string(),
        })
    }
}
