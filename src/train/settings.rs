//! The typed view of a resolved run config that the trainer reads. The catalog in
//! `config/keys.rs` has already checked every value and holds every default.

use serde_json::Value as J;

use crate::config::grid::lr_schedule;
use crate::config::keys::Resolved;
use crate::model::lora::LoraConfig;
use crate::model::quant::QuantSpec;
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
    /// Quantize the base at load (QLoRA); `None` keeps it as stored.
    pub quantize: Option<QuantSpec>,
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
        let r = Resolved(c);
        Ok(TrainSettings {
            model: r.str("model")?,
            data: r.str("data")?,
            device: r.str("device")?,
            dtype: r.str("dtype")?,
            iters: r.u64("train.iters")?,
            batch_size: r.usize("train.batch_size")?,
            schedule: lr_schedule(c).map_err(|e| anyhow::anyhow!("train.lr_schedule: {e}"))?,
            optimizer: r.str("train.optimizer")?,
            beta1: r.f64("train.beta1")?,
            beta2: r.f64("train.beta2")?,
            eps: r.f64("train.eps")?,
            weight_decay: r.f64("train.weight_decay")?,
            grad_clip: r.opt_f64("train.grad_clip")?,
            grad_accumulation: r.u64("train.grad_accumulation")?,
            grad_checkpoint: r.bool("train.grad_checkpoint")?,
            max_seq_length: r.usize("train.max_seq_length")?,
            mask_prompt: r.bool("train.mask_prompt")?,
            steps_per_report: r.u64("train.steps_per_report")?,
            steps_per_eval: r.u64("train.steps_per_eval")?,
            val_batches: r.i64("train.val_batches")?,
            save_every: r.u64("train.save_every")?,
            seed: r.u64("train.seed")?,
            lora: LoraConfig {
                rank: r.usize("lora.rank")?,
                scale: r.f64("lora.scale")?,
                dropout: r.f64("lora.dropout")?,
                keys: r.strings("lora.keys")?,
                num_layers: r.i64("lora.num_layers")?,
                dora: r.str("lora.fine_tune_type")? == "dora",
                full: r.str("lora.fine_tune_type")? == "full",
            },
            quantize: match r.usize("quantize.bits")? {
                0 => None,
                bits => Some(QuantSpec {
                    bits,
                    group_size: r.usize("quantize.group_size")?,
                }),
            },
            test: r.bool("eval.test")?,
            test_batches: r.i64("eval.test_batches")?,
            generate: r.usize("eval.generate")?,
            prompts: r.strings("eval.prompts")?,
            max_tokens: r.usize("eval.max_tokens")?,
            metric: r.str("eval.metric")?,
            regex: r.str("eval.regex")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::keys::{CATALOG, defaults, set_path};

    /// A config that lacks any defaulted key reads the catalog's default: there is no second
    /// copy of a default here that could drift from the catalog.
    #[test]
    fn missing_keys_read_the_catalog_defaults() {
        let mut full = defaults();
        set_path(&mut full, "model", J::from("m"));
        set_path(&mut full, "data", J::from("d"));
        let want = format!("{:?}", TrainSettings::from_config(&full).unwrap());
        for k in CATALOG.iter().filter(|k| k.default.is_some()) {
            let mut c = full.clone();
            let (section, leaf) = match k.key.split_once('.') {
                Some((s, l)) => (Some(s), l),
                None => (None, k.key),
            };
            let holder = match section {
                Some(s) => &mut c[s],
                None => &mut c,
            };
            if let J::Object(m) = holder {
                m.remove(leaf);
            }
            let got = format!("{:?}", TrainSettings::from_config(&c).unwrap());
            assert_eq!(got, want, "without `{}`", k.key);
        }
    }
}
