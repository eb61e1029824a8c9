//! Merging a PEFT LoRA adapter into a copy of a safetensors checkpoint, streaming.
//!
//! Every LoRA of the adapter becomes `W' = W + scaling · B A` in its target weight, with
//! `scaling = lora_alpha / r` (`lora_alpha / √r` with rsLoRA), resolved per module through
//! `rank_pattern` / `alpha_pattern` as PEFT does it. The sum is computed in f32 (the rank-r
//! product accumulated with fused multiply-adds, as a BLAS matmul does) and rounded once to the
//! weight's dtype (round to nearest even, as torch casts). Whole tensors an
//! adapter carries (PEFT's `save_embedding_layers`, `modules_to_save`, trained biases) replace
//! the checkpoint's, as PEFT loads them, LoRA added on top where there is one. DoRA and LoRA
//! biases (`lora_bias`) are refused.
//!
//! Everything else is copied byte for byte. A merged tensor keeps its dtype and shape, so each
//! output shard keeps the input's header verbatim and only the bytes of the merged tensors
//! change; the bytes around them are copied by the kernel (`copy_file_range` where the
//! platform has it), without passing through this process. The other files of the checkpoint
//! directory (config, tokenizer, `model.safetensors.index.json`, ...) are copied as they are.
//!
//! Memory: the input shards are memory-mapped; a merged tensor is processed in chunks of rows
//! of 1 MiB (rows in parallel, while a writer thread writes the previous chunks and copies the
//! bytes between merged tensors; three chunk buffers circulate) and the pages already read are
//! released, so the resident set stays at a few MiB plus the adapter's factors (as f32)
//! whatever the size of the checkpoint.
//!
//! Atomic: everything is checked before anything is written; the output is assembled in a
//! temporary directory next to `out_dir` and renamed into place at the end. On any error or
//! cancellation the temporary directory is removed and `out_dir` is left as it was. The files
//! are not fsynced (neither are `cp`'s or `save_pretrained`'s: a merged checkpoint can be
//! made again, and syncing gigabytes would take several times longer than the copy).
//!
//! Layout: `config` reads the adapter (`adapter_config.json`, PEFT's keys, scaling patterns),
//! `plan` opens the checkpoint and maps each LoRA and whole tensor onto its target, `kernel`
//! computes the merged rows, `io` writes the shards and installs the output directory, and
//! [`merge`] here runs them in that order. Each file's tests sit beside it (`testutil` holds
//! their shared fixtures).

mod config;
mod io;
mod kernel;
mod plan;
#[cfg(test)]
mod testutil;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use memmap2::Mmap;
use rayon::prelude::*;
use serde_json::Value;

use crate::analyze::Progress;
use crate::dtype::{decode_f32, DType};
use crate::error::{Error, Result};
use crate::source::{parse_safetensors, StoredType, TensorInfo};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The prefix `PeftModel.save_pretrained` puts before module paths.
const PEFT_PREFIX: &str = "base_model.model.";
/// Untouched bytes are copied in pieces of this size, checking for cancellation in between.
const COPY_PIECE: u64 = 64 << 20;
/// Target size of one chunk of a merged tensor (whole rows; at least one row).
const CHUNK_BYTES: usize = 1 << 20;
/// Top-level entries of a checkpoint directory that describe the original files (git
/// objects, hub download metadata) and are not copied.
const SKIPPED_ENTRIES: [&str; 2] = [".git", ".cache"];
/// Model families whose attention/MLP projections are `transformers`' `Conv1D` (weight stored
/// `[in, out]`): PEFT merges the transposed product there whatever `fan_in_fan_out` says.
const CONV1D_MODEL_TYPES: [&str; 4] = ["gpt2", "openai-gpt", "imagegpt", "decision_transformer"];
const CONV1D_MODULES: [&str; 4] = ["c_attn", "c_proj", "c_fc", "q_attn"];

#[derive(Clone, Copy, Debug, Default)]
pub struct MergeOptions {
    /// Replace `out_dir` when it exists (only a checkpoint directory or an empty one).
    pub overwrite: bool,
}

/// What a LoRA adapts: a linear layer (`lora_A`/`lora_B`) or an embedding
/// (`lora_embedding_A`/`lora_embedding_B`, whose product is stored transposed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraKind {
    Linear,
    Embedding,
}

/// One LoRA of an adapter, factors decoded to f32 (row-major).
#[derive(Clone, Debug)]
pub struct Lora {
    /// Module path in the base model, e.g. `model.layers.5.self_attn.o_proj`.
    pub module: String,
    pub kind: LoraKind,
    pub rank: usize,
    /// `lora_A`: `[rank, d_in]`.
    pub a: Vec<f32>,
    pub d_in: usize,
    /// `lora_B`: `[d_out, rank]`.
    pub b: Vec<f32>,
    pub d_out: usize,
    /// `lora_alpha / r` or `lora_alpha / √r` (rsLoRA), for this module.
    pub scaling: f64,
}

/// A whole tensor an adapter carries in place of the base model's: the embeddings PEFT saves
/// with `save_embedding_layers` (`<module>.base_layer.weight`, or `<module>.weight` of a
/// resized, untargeted embedding), `modules_to_save` copies (`<module>.modules_to_save.*`) and
/// trained biases (`bias: "all"` / `"lora_only"`). PEFT loads them over the base weights, so the
/// merge starts from them.
#[derive(Clone, Debug)]
pub struct FullTensor {
    /// The key in the adapter file.
    pub key: String,
    /// The checkpoint tensor it replaces (the key without PEFT's prefix and wrappers).
    pub target: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    offset: usize,
}

/// A PEFT LoRA adapter directory, read and checked.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub dir: PathBuf,
    pub fan_in_fan_out: bool,
    /// In the order of the adapter file.
    pub loras: Vec<Lora>,
    /// In the order of the adapter file.
    pub full: Vec<FullTensor>,
    /// `adapter_model.safetensors` and its map (the full tensors are read from it).
    path: PathBuf,
    map: Arc<Mmap>,
}

/// One merged tensor.
#[derive(Clone, Debug)]
pub struct MergedTensor {
    /// The checkpoint tensor, e.g. `model.layers.5.self_attn.o_proj.weight`.
    pub tensor: String,
    /// The shard that holds it, relative to the checkpoint directory.
    pub shard: PathBuf,
    pub module: String,
    pub rank: usize,
    pub scaling: f64,
    pub dtype: DType,
    /// The weight the LoRA was added to (or, with rank 0, the whole tensor) came from the
    /// adapter (see [`FullTensor`]), not from the checkpoint.
    pub from_adapter: bool,
}

/// What [`merge`] wrote.
#[derive(Clone, Debug)]
pub struct MergeSummary {
    pub out_dir: PathBuf,
    /// Shards written, relative to the directory, in order.
    pub shards: Vec<PathBuf>,
    pub merged: Vec<MergedTensor>,
    /// Other files copied, relative to the directory.
    pub copied: Vec<PathBuf>,
    pub bytes: u64,
}

pub use config::read_adapter;

use io::*;
use kernel::*;
use plan::*;

// --------------------------------------------------------------------------- merge

/// Write a copy of the checkpoint in `model_dir` to `out_dir` with the LoRAs of the adapter
/// in `adapter_dir` merged into their weights (see the module documentation).
///
/// `progress` counts bytes written out of the total; setting its `cancel` flag stops the work
/// with [`Error::Cancelled`], leaving nothing behind.
pub fn merge(
    model_dir: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    opts: &MergeOptions,
    progress: &Progress,
) -> Result<MergeSummary> {
    let mut adapter = read_adapter(adapter_dir)?;
    let ckpt = open_checkpoint(model_dir)?;
    check_out_dir(out_dir, model_dir, adapter_dir, opts.overwrite)?;
    let targets = plan(&mut adapter, &ckpt, model_dir)?;
    let shard_paths: HashSet<&Path> = ckpt.shards.iter().map(|s| s.rel.as_path()).collect();
    let others = other_entries(model_dir, &shard_paths)?;
    let total: u64 = ckpt.shards.iter().map(|s| s.map.len() as u64).sum::<u64>()
        + others.iter().map(|(_, _, n)| n).sum::<u64>();
    progress.total.store(total, Ordering::Relaxed);
    progress.done.store(0, Ordering::Relaxed);

    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp_path = sibling(out_dir, "tmp");
    fs::create_dir(&tmp_path).map_err(|e| Error::io(&tmp_path, e))?;
    let tmp = TempDir(Some(tmp_path));

    for (s, shard) in ckpt.shards.iter().enumerate() {
        let mine: Vec<&Target> = targets.iter().filter(|t| t.shard == s).collect();
        write_shard(
            shard,
            &adapter,
            &mine,
            &tmp.path().join(&shard.rel),
            progress,
        )?;
    }
    let mut copied = Vec::new();
    for (rel, is_dir, _) in &others {
        let dst = tmp.path().join(rel);
        if *is_dir {
            fs::create_dir_all(&dst).map_err(|e| Error::io(&dst, e))?;
        } else {
            copy_file(&model_dir.join(rel), &dst, progress)?;
            copied.push(rel.clone());
        }
    }
    check_cancel(progress)?;
    install(tmp, out_dir)?;
    Ok(MergeSummary {
        out_dir: out_dir.to_path_buf(),
        shards: ckpt.shards.iter().map(|s| s.rel.clone()).collect(),
        merged: targets
            .iter()
            .map(|t| MergedTensor {
                tensor: t.tensor.name.clone(),
                shard: ckpt.shards[t.shard].rel.clone(),
                module: t.module.clone(),
                rank: t.rank,
                scaling: t.scaling_f64,
                dtype: t.dtype,
                from_adapter: t.from_adapter.is_some(),
            })
            .collect(),
        copied,
        bytes: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::testutil::*;

    #[test]
    fn merges_targets_and_copies_everything_else() {
        let f = fixture();
        let progress = Progress::default();
        let summary = merge(
            &f.model,
            &f.adapter,
            &f.out,
            &MergeOptions::default(),
            &progress,
        )
        .unwrap();
        assert_eq!(
            summary.shards,
            vec![PathBuf::from(SHARD1), PathBuf::from(SHARD2)]
        );
        let merged: Vec<&str> = summary.merged.iter().map(|m| m.tensor.as_str()).collect();
        assert_eq!(
            merged,
            [
                "model.layers.0.self_attn.o_proj.weight",
                "model.layers.0.mlp.down_proj.weight",
                "model.layers.1.self_attn.o_proj.weight",
                "lm_head.weight"
            ]
        );
        assert!(summary
            .merged
            .iter()
            .all(|m| m.scaling == 2.0 && m.rank == 2));
        assert_eq!(progress.done.load(Ordering::Relaxed), summary.bytes);
        assert_eq!(progress.total.load(Ordering::Relaxed), summary.bytes);

        for (shard, tensors) in [(SHARD1, &f.shard1), (SHARD2, &f.shard2)] {
            let (src, dst) = (f.model.join(shard), f.out.join(shard));
            let (a, b) = (fs::read(&src).unwrap(), fs::read(&dst).unwrap());
            assert_eq!(a.len(), b.len());
            // The header is kept verbatim.
            let n = 8 + u64::from_le_bytes(a[..8].try_into().unwrap()) as usize;
            assert_eq!(a[..n], b[..n]);
            for (name, dtype, _, w) in tensors.iter() {
                let (_, _, got) = read_tensor(&dst, name);
                let module = name.strip_suffix(".weight").unwrap();
                if merged.contains(&name.as_str()) {
                    let (av, bv) = (
                        adapter_factor(&f, module, "lora_A"),
                        adapter_factor(&f, module, "lora_B"),
                    );
                    assert_eq!(got, expected(w, &av, &bv, 2, 2.0, false, *dtype), "{name}");
                    assert_ne!(got, read_tensor(&src, name).2, "{name} unchanged");
                } else {
                    assert_eq!(got, read_tensor(&src, name).2, "{name} changed");
                }
            }
        }
        let buf = fs::read(f.out.join(SHARD2)).unwrap();
        let ids = parse_safetensors(&buf, Path::new("x"))
            .unwrap()
            .into_iter()
            .find(|t| t.name == "position_ids")
            .unwrap();
        assert_eq!(
            buf[ids.offset..ids.offset + 24],
            fs::read(f.model.join(SHARD2)).unwrap()[ids.offset..ids.offset + 24]
        );
        for other in [INDEX_FILE, "config.json", "tokenizer.json", "sub/notes.txt"] {
            assert_eq!(
                fs::read(f.model.join(other)).unwrap(),
                fs::read(f.out.join(other)).unwrap(),
                "{other}"
            );
        }
        assert!(!f.out.join(".git").exists());
        let mut copied = summary.copied.clone();
        copied.sort();
        assert_eq!(
            copied,
            ["config.json", INDEX_FILE, "sub/notes.txt", "tokenizer.json"].map(PathBuf::from)
        );
        // Only the output is left next to it.
        let names: Vec<_> = fs::read_dir(f.out.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["merged"]);
    }

    #[test]
    fn single_file_without_index_and_overwrite() {
        let f = fixture();
        fs::remove_file(f.model.join(INDEX_FILE)).unwrap();
        fs::remove_file(f.model.join(SHARD2)).unwrap();
        fs::rename(f.model.join(SHARD1), f.model.join("model.safetensors")).unwrap();
        let adapter = f.adapter.with_file_name("small");
        write_adapter(
            &adapter,
            &lora_config(1, 1.0),
            &[("model.layers.0.self_attn.o_proj", vec![1, 6], vec![6, 1])],
        );
        let go = |overwrite| {
            merge(
                &f.model,
                &adapter,
                &f.out,
                &MergeOptions { overwrite },
                &Progress::default(),
            )
        };
        let s = go(false).unwrap();
        assert_eq!(s.shards, [PathBuf::from("model.safetensors")]);
        assert_eq!(s.merged.len(), 1);
        let e = go(false).unwrap_err();
        assert!(
            matches!(&e, Error::Invalid(m) if m.contains("already exists")),
            "{e}"
        );
        fs::write(f.out.join("stale.txt"), b"old").unwrap();
        go(true).unwrap();
        assert!(!f.out.join("stale.txt").exists());
        assert!(f.out.join("model.safetensors").is_file());
        let names: Vec<_> = fs::read_dir(f.out.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["merged"]);
    }
}
