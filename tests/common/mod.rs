//! Shared by the integration tests: where the reference data is, and reading its tensors.
#![allow(dead_code)]

use std::path::PathBuf;

/// `../shared/reference` beside the crate, or `$TUNA_REFERENCE`. Missing data fails the
/// test with the place it looked: a skipped parity test would prove nothing.
pub fn reference_dir() -> PathBuf {
    let dir = match std::env::var_os("TUNA_REFERENCE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference"),
    };
    assert!(
        dir.join("expected.safetensors").exists(),
        "reference data not found: looked for {} (set TUNA_REFERENCE to the folder holding expected.safetensors)",
        dir.join("expected.safetensors").display()
    );
    dir
}

/// The reference tensors, converted to f64 / i64 on request.
pub struct Expected(Vec<u8>);

impl Expected {
    pub fn load() -> Self {
        Expected(std::fs::read(reference_dir().join("expected.safetensors")).unwrap())
    }

    fn view(&self, name: &str) -> (safetensors::Dtype, Vec<u8>) {
        let st = safetensors::SafeTensors::deserialize(&self.0).unwrap();
        let v = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("reference tensor `{name}` missing"));
        (v.dtype(), v.data().to_vec())
    }

    pub fn f64(&self, name: &str) -> Vec<f64> {
        let (dt, b) = self.view(name);
        match dt {
            safetensors::Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            safetensors::Dtype::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            other => panic!("{name}: unexpected dtype {other:?}"),
        }
    }

    pub fn f32(&self, name: &str) -> Vec<f32> {
        let (dt, b) = self.view(name);
        assert_eq!(dt, safetensors::Dtype::F32, "{name}");
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    pub fn i64(&self, name: &str) -> Vec<i64> {
        let (dt, b) = self.view(name);
        assert_eq!(dt, safetensors::Dtype::I64, "{name}");
        b.chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    /// Token ids (stored as i64) as the model takes them.
    pub fn ids(&self, name: &str) -> Vec<u32> {
        self.i64(name).iter().map(|&x| x as u32).collect()
    }
}

/// 16 greedily generated tokens after `prompt` (no stopping at EOS), as the references hold them.
pub fn greedy16(model: &tuna::model::llama::Llama, prompt: &[u32]) -> Vec<u32> {
    let config = tuna::generate::GenerateConfig {
        max_new_tokens: 16,
        ..Default::default()
    };
    tuna::generate::generate(model, prompt, &config, None, &mut |_| true)
        .unwrap()
        .tokens
}

/// The reference's masked LoRA example (`tiny-llama.lora`) as the trainer's one-row batch: the
/// loss covers the tokens after `prompt_len`.
pub fn lora_example_batch() -> tuna::data::dataset::Batch {
    example_batch("tiny-llama")
}

/// The reference's masked example of `model` (`<model>.lora`), as a one-row batch.
pub fn example_batch(model: &str) -> tuna::data::dataset::Batch {
    let exp = Expected::load();
    let ids: Vec<u32> = exp
        .i64(&format!("{model}.lora.ids"))
        .iter()
        .map(|&x| x as u32)
        .collect();
    let p = exp.i64(&format!("{model}.lora.prompt_len"))[0] as usize;
    let n = ids.len();
    tuna::data::dataset::Batch {
        batch: 1,
        seq: n,
        attention: vec![1.0; n],
        loss_mask: (0..n).map(|t| if t >= p { 1.0 } else { 0.0 }).collect(),
        lengths: vec![n],
        ids,
    }
}

/// Largest absolute difference of two equally long slices.
pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Relative L2 distance of `a` from `b`.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// An f32 tensor of a safetensors file's bytes, flattened.
pub fn f32_tensor(bytes: &[u8], name: &str) -> Vec<f32> {
    safetensors::SafeTensors::deserialize(bytes)
        .unwrap()
        .tensor(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}
