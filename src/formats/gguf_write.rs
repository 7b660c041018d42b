//! Writing GGUF files (version 3, as llama.cpp reads them): metadata, tensor infos and
//! 32-byte-aligned tensor data, streamed tensor by tensor so that a large model is never held
//! twice in memory. The block quantizers follow ggml's reference ones (`quantize_row_q8_0_ref`,
//! `quantize_row_q4_0_ref`); `tests/gguf_export.rs` checks their bytes against gguf-py's.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::gguf::GgmlType;

/// The alignment of tensor data (llama.cpp's default, `general.alignment` is not written).
pub const ALIGNMENT: u64 = 32;

pub const F32: GgmlType = GgmlType(0);
pub const F16: GgmlType = GgmlType(1);
pub const Q4_0: GgmlType = GgmlType(2);
pub const Q8_0: GgmlType = GgmlType(8);

/// One metadata value, in the GGUF value types llama.cpp's converter writes.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
    F32Array(Vec<f32>),
}

/// What a tensor will hold: its GGUF name, dims in ggml order (fastest-varying first, i.e.
/// an HF `[rows, cols]` weight is `[cols, rows]`) and storage type.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorPlan {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of the stored data; the row length must be a whole number of blocks.
    pub fn n_bytes(&self) -> Result<u64> {
        let (block, bytes) = self
            .ty
            .block_layout()
            .with_context(|| format!("`{}`: no block layout for {}", self.name, self.ty))?;
        let row = self.dims.first().copied().unwrap_or(1);
        if row % block as u64 != 0 {
            bail!(
                "`{}`: rows of {row} values are not a multiple of {}'s block of {block}",
                self.name,
                self.ty
            );
        }
        Ok(self.n_elements() / block as u64 * bytes as u64)
    }
}

/// Writes a GGUF file: `meta` in order, then `tensors`, whose bytes `data(i)` produces when
/// the writer reaches tensor `i` (its length is checked against the plan). Written to a
/// temporary file and renamed, so a failed export leaves no half file under `path`.
pub fn write_gguf(
    path: &Path,
    meta: &[(String, MetaValue)],
    tensors: &[TensorPlan],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let tmp = crate::files::unique_tmp(path);
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let put = |w: &mut BufWriter<std::fs::File>, pos: &mut u64, b: &[u8]| -> Result<()> {
            w.write_all(b)?;
            *pos += b.len() as u64;
            Ok(())
        };
        let mut pos = 0u64;
        let mut head = Vec::new();
        head.extend_from_slice(b"GGUF");
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        for (key, value) in meta {
            put_str(&mut head, key);
            put_value(&mut head, value);
        }
        let mut offset = 0u64;
        let mut sizes = Vec::with_capacity(tensors.len());
        for t in tensors {
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ty.0.to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            let n = t.n_bytes()?;
            sizes.push(n);
            offset += n.next_multiple_of(ALIGNMENT);
        }
        put(&mut w, &mut pos, &head)?;
        let pad = |pos: u64| (pos.next_multiple_of(ALIGNMENT) - pos) as usize;
        let zeros = [0u8; ALIGNMENT as usize];
        let p = pad(pos);
        put(&mut w, &mut pos, &zeros[..p])?;
        for (i, t) in tensors.iter().enumerate() {
            let bytes = data(i)?;
            if bytes.len() as u64 != sizes[i] {
                bail!(
                    "`{}`: {} bytes of data for a {} tensor of {:?} ({} expected)",
                    t.name,
                    bytes.len(),
                    t.ty,
                    t.dims,
                    sizes[i]
                );
            }
            put(&mut w, &mut pos, &bytes)?;
            let p = pad(pos);
            put(&mut w, &mut pos, &zeros[..p])?;
        }
        w.flush()?;
        w.get_ref().sync_all()?;
        Ok(())
    })();
    match result {
        Ok(()) => std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display())),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e.context(format!("writing {}", path.display())))
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

// GGUF value type codes.
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STR: u32 = 8;
const T_ARRAY: u32 = 9;

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    let array_head = |out: &mut Vec<u8>, ty: u32, n: usize| {
        out.extend_from_slice(&T_ARRAY.to_le_bytes());
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&(n as u64).to_le_bytes());
    };
    match v {
        MetaValue::U32(x) => {
            out.extend_from_slice(&T_U32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        MetaValue::I32(x) => {
            out.extend_from_slice(&T_I32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        MetaValue::F32(x) => {
            out.extend_from_slice(&T_F32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        MetaValue::Bool(x) => {
            out.extend_from_slice(&T_BOOL.to_le_bytes());
            out.push(*x as u8);
        }
        MetaValue::Str(s) => {
            out.extend_from_slice(&T_STR.to_le_bytes());
            put_str(out, s);
        }
        MetaValue::StrArray(a) => {
            array_head(out, T_STR, a.len());
            for s in a {
                put_str(out, s);
            }
        }
        MetaValue::I32Array(a) => {
            array_head(out, T_I32, a.len());
            for x in a {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        MetaValue::F32Array(a) => {
            array_head(out, T_F32, a.len());
            for x in a {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// `values` (whole rows, row length a multiple of the block) stored as `ty`.
pub fn encode(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>> {
    use rayon::prelude::*;
    let blocks = |block: usize, bytes: usize, f: fn(&[f32], &mut [u8])| {
        let mut out = vec![0u8; values.len() / block * bytes];
        out.par_chunks_mut(bytes)
            .zip(values.par_chunks(block))
            .for_each(|(o, x)| f(x, o));
        out
    };
    Ok(match ty {
        F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        F16 => values
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        Q8_0 if values.len().is_multiple_of(32) => blocks(32, 34, quantize_block_q8_0),
        Q4_0 if values.len().is_multiple_of(32) => blocks(32, 18, quantize_block_q4_0),
        _ => bail!("cannot encode {} values as {ty}", values.len()),
    })
}

/// ggml's `quantize_row_q8_0_ref` for one block of 32: `d = amax / 127` (stored as f16),
/// `q = round(x / d)`.
pub fn quantize_block_q8_0(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
    for (o, v) in out[2..34].iter_mut().zip(x) {
        *o = ((v * id).round() as i8) as u8;
    }
}

/// ggml's `quantize_row_q4_0_ref` for one block of 32: the value of largest magnitude (with
/// its sign) maps to -8, `d = max / -8`, `q = min(15, trunc(x / d + 8.5))`; element j and
/// j + 16 share byte j (low and high nibble).
pub fn quantize_block_q4_0(x: &[f32], out: &mut [u8]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
    let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    for j in 0..16 {
        out[2 + j] = q(x[j]) | (q(x[j + 16]) << 4);
    }
}
