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

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
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

// --------------------------------------------------------------------------- adapter

struct LoraConfig {
    r: usize,
    alpha: f64,
    rslora: bool,
    fan_in_fan_out: bool,
    rank_pattern: Vec<(String, usize)>,
    alpha_pattern: Vec<(String, f64)>,
    /// `target_modules`: names (a module is targeted when its path is one or ends with
    /// `.name`) or one regular expression the whole path must match; None selects every module
    /// (absent, or `"all-linear"`).
    targets: Option<Targets>,
}

enum Targets {
    Names(Vec<String>),
    Pattern(String),
}

impl LoraConfig {
    /// Whether PEFT puts a LoRA on `module` (peft `check_target_module_exists`): the LoRA
    /// tensors of other modules are dropped when PEFT loads the adapter.
    fn targets(&self, module: &str, path: &Path) -> Result<bool> {
        Ok(match &self.targets {
            None => true,
            Some(Targets::Names(names)) => names
                .iter()
                .any(|n| module == n || module.ends_with(&format!(".{n}"))),
            Some(Targets::Pattern(p)) => regex_automata::meta::Regex::new(&format!("^(?:{p})$"))
                .map_err(|e| {
                    Error::dump(
                        path,
                        None,
                        format!(
                            "target_modules {p:?} is not a regular expression rank1fast can \
                             match: {e}"
                        ),
                    )
                })?
                .is_match(module),
        })
    }
}

fn parse_config(bytes: &[u8], path: &Path) -> Result<LoraConfig> {
    let bad = |msg: String| Error::dump(path, None, msg);
    let doc: Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let obj = doc
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    let flag = |key: &str| obj.get(key).and_then(Value::as_bool).unwrap_or(false);
    match obj.get("peft_type").and_then(Value::as_str) {
        Some(t) if t.eq_ignore_ascii_case("lora") => {}
        other => {
            return Err(bad(format!(
                "peft_type is {}, not LORA: only LoRA adapters can be merged",
                other.map_or("missing".to_string(), |t| format!("{t:?}"))
            )))
        }
    }
    if flag("use_dora") {
        return Err(bad(
            "a DoRA adapter (use_dora: true): merging DoRA needs the weight norms of the merged \
             product and is not supported; merge it with PEFT's merge_and_unload"
                .into(),
        ));
    }
    if flag("lora_bias") {
        return Err(bad(
            "the adapter has LoRA biases (lora_bias: true), which change the module bias, not \
             only the weight; merging them is not supported"
                .into(),
        ));
    }
    let r = obj
        .get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| bad("\"r\" must be a positive integer".into()))? as usize;
    let alpha = match obj.get("lora_alpha") {
        // PEFT's default.
        None | Some(Value::Null) => 8.0,
        Some(v) => v
            .as_f64()
            .filter(|a| a.is_finite())
            .ok_or_else(|| bad(format!("\"lora_alpha\" must be a number, got {v}")))?,
    };
    let pattern = |key: &str| -> Result<Vec<(String, f64)>> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| {
                    v.as_f64()
                        .filter(|x| x.is_finite())
                        .map(|x| (k.clone(), x))
                        .ok_or_else(|| bad(format!("{key}[{k:?}] must be a number, got {v}")))
                })
                .collect(),
            Some(v) => Err(bad(format!("\"{key}\" must be an object, got {v}"))),
        }
    };
    let rank_pattern = pattern("rank_pattern")?
        .into_iter()
        .map(|(k, v)| {
            if v >= 1.0 && v.fract() == 0.0 {
                Ok((k, v as usize))
            } else {
                Err(bad(format!(
                    "rank_pattern[{k:?}] must be a positive integer, got {v}"
                )))
            }
        })
        .collect::<Result<_>>()?;
    let targets = match obj.get("target_modules") {
        Some(Value::String(p)) if p != "all-linear" => Some(Targets::Pattern(p.clone())),
        Some(Value::Array(a)) => Some(Targets::Names(
            a.iter()
                .map(|v| {
                    v.as_str().map(str::to_owned).ok_or_else(|| {
                        bad(format!("target_modules entries must be strings, got {v}"))
                    })
                })
                .collect::<Result<_>>()?,
        )),
        _ => None,
    };
    Ok(LoraConfig {
        targets,
        r,
        alpha,
        rslora: flag("use_rslora"),
        fan_in_fan_out: flag("fan_in_fan_out"),
        rank_pattern,
        alpha_pattern: pattern("alpha_pattern")?,
    })
}

/// The value of the first pattern that matches `module`, as PEFT's `get_pattern_key` finds it:
/// `re.match(rf"(.*\.)?({key})$", module)`.
fn pattern_value<T: Copy>(
    patterns: &[(String, T)],
    module: &str,
    path: &Path,
) -> Result<Option<T>> {
    for (key, value) in patterns {
        let re =
            regex_automata::meta::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| {
                Error::dump(
                    path,
                    None,
                    format!("pattern {key:?} is not a regular expression rank1fast can match: {e}"),
                )
            })?;
        if re.is_match(module) {
            return Ok(Some(*value));
        }
    }
    Ok(None)
}

/// Which factor of which module a tensor of an adapter file is.
enum FactorKey<'a> {
    Factor {
        module: &'a str,
        kind: LoraKind,
        is_a: bool,
    },
    LoraBias,
    Magnitude,
    Other,
}

/// The checkpoint tensor a whole tensor of an adapter replaces: the key without PEFT's prefix
/// and its `base_layer` / `modules_to_save` wrappers.
fn full_target(key: &str) -> String {
    key.strip_prefix(PEFT_PREFIX)
        .unwrap_or(key)
        .split('.')
        .filter(|p| !matches!(*p, "base_layer" | "modules_to_save"))
        .collect::<Vec<_>>()
        .join(".")
}

fn factor_key(name: &str) -> FactorKey<'_> {
    let parts: Vec<&str> = name.split('.').collect();
    let Some(i) = parts.iter().position(|p| {
        matches!(
            *p,
            "lora_A" | "lora_B" | "lora_embedding_A" | "lora_embedding_B" | "lora_magnitude_vector"
        )
    }) else {
        return FactorKey::Other;
    };
    if i == 0 {
        return FactorKey::Other;
    }
    let rest = &parts[i + 1..];
    let module_len = parts[..i].iter().map(|p| p.len() + 1).sum::<usize>() - 1;
    let module = &name[..module_len];
    let module = module.strip_prefix(PEFT_PREFIX).unwrap_or(module);
    let (kind, is_a) = match parts[i] {
        "lora_magnitude_vector" => return FactorKey::Magnitude,
        "lora_A" => (LoraKind::Linear, true),
        "lora_B" => (LoraKind::Linear, false),
        "lora_embedding_A" => (LoraKind::Embedding, true),
        _ => (LoraKind::Embedding, false),
    };
    // `.weight` (or `.<adapter name>.weight`) for layers, nothing (or the adapter name) for
    // the parameters of embeddings.
    let ok = match kind {
        LoraKind::Linear => matches!(rest, ["weight"] | [_, "weight"]),
        LoraKind::Embedding => rest.len() <= 1,
    };
    if kind == LoraKind::Linear && !is_a && matches!(rest, ["bias"] | [_, "bias"]) {
        return FactorKey::LoraBias;
    }
    if !ok || module.is_empty() {
        return FactorKey::Other;
    }
    FactorKey::Factor { module, kind, is_a }
}

/// Read and check a PEFT LoRA adapter directory (`adapter_config.json` +
/// `adapter_model.safetensors`).
pub fn read_adapter(dir: &Path) -> Result<Adapter> {
    let meta = fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::dump(
            dir,
            None,
            "not an adapter directory (expected adapter_config.json and adapter_model.safetensors)",
        ));
    }
    let config_path = dir.join(ADAPTER_CONFIG);
    let bytes = fs::read(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let config = parse_config(&bytes, &config_path)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    if !path.exists() && dir.join("adapter_model.bin").exists() {
        return Err(Error::dump(
            dir,
            None,
            "holds adapter_model.bin only; merging reads adapter_model.safetensors (save the \
             adapter with safe_serialization=True)",
        ));
    }
    let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
    // SAFETY: read-only map of a file we only read; see source::MappedFile.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
    let tensors = parse_safetensors(&map, &path)?;

    // module -> (kind, A, B), in file order.
    let mut order: Vec<&str> = Vec::new();
    let mut full: Vec<FullTensor> = Vec::new();
    let mut factors: HashMap<&str, (LoraKind, Option<&TensorInfo>, Option<&TensorInfo>)> =
        HashMap::new();
    for t in &tensors {
        let (module, kind, is_a) = match factor_key(&t.name) {
            FactorKey::Factor { module, kind, is_a } => (module, kind, is_a),
            FactorKey::Magnitude => {
                return Err(Error::dump(
                    &path,
                    Some(&t.name),
                    "a DoRA magnitude vector: DoRA adapters cannot be merged here; merge them \
                     with PEFT's merge_and_unload",
                ))
            }
            FactorKey::LoraBias => {
                return Err(Error::dump(
                    &path,
                    Some(&t.name),
                    "a LoRA bias (lora_bias=True): it changes the module bias, not only the \
                     weight; merging LoRA biases is not supported",
                ))
            }
            FactorKey::Other => {
                let StoredType::Float(dtype) = t.stored else {
                    return Err(Error::dump(
                        &path,
                        Some(&t.name),
                        "neither a LoRA factor nor a float32, float16 or bfloat16 tensor",
                    ));
                };
                full.push(FullTensor {
                    key: t.name.clone(),
                    target: full_target(&t.name),
                    dtype,
                    shape: t.shape.clone(),
                    offset: t.offset,
                });
                continue;
            }
        };
        // PEFT loads `base_model.model.<module>.lora_A.weight` (the prefix once, no adapter name)
        // with strict=False: any other spelling is dropped and the served adapter does nothing
        // there, so merging it would make a checkpoint that differs from the served adapter.
        let factor = match (kind, is_a) {
            (LoraKind::Linear, true) => "lora_A.weight",
            (LoraKind::Linear, false) => "lora_B.weight",
            (LoraKind::Embedding, true) => "lora_embedding_A",
            (LoraKind::Embedding, false) => "lora_embedding_B",
        };
        if module.starts_with("base_model.") || t.name != format!("{PEFT_PREFIX}{module}.{factor}")
        {
            return Err(Error::dump(
                &path,
                Some(&t.name),
                format!(
                    "PEFT would not load this key (it loads {PEFT_PREFIX}<module>.{factor}, \
                     the prefix once and no adapter name): refusing to merge what the served \
                     adapter would not apply"
                ),
            ));
        }
        if !config.targets(module, &config_path)? {
            return Err(Error::dump(
                &path,
                Some(&t.name),
                format!(
                    "module {module} is not in target_modules: PEFT would not load this key; \
                     refusing to merge what the served adapter would not apply"
                ),
            ));
        }
        let entry = factors.entry(module).or_insert_with(|| {
            order.push(module);
            (kind, None, None)
        });
        let slot = if is_a { &mut entry.1 } else { &mut entry.2 };
        if entry.0 != kind || slot.is_some() {
            return Err(Error::dump(
                &path,
                Some(&t.name),
                format!("module {module} has this factor twice"),
            ));
        }
        *slot = Some(t);
    }
    if order.is_empty() && full.is_empty() {
        return Err(Error::dump(&path, None, "holds no LoRA factor"));
    }
    let decode = |t: &TensorInfo| -> Result<Vec<f32>> {
        let StoredType::Float(dtype) = t.stored else {
            return Err(Error::dump(
                &path,
                Some(&t.name),
                "LoRA factors must be float32, float16 or bfloat16",
            ));
        };
        if t.shape.len() != 2 {
            return Err(Error::dump(
                &path,
                Some(&t.name),
                format!(
                    "shape {:?}: only 2-D LoRA factors (linear and embedding layers) can be \
                     merged",
                    t.shape
                ),
            ));
        }
        let mut v = vec![0f32; t.nbytes / dtype.size()];
        decode_f32(dtype, &map[t.offset..t.offset + t.nbytes], &mut v);
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::dump(
                &path,
                Some(&t.name),
                format!("holds a non-finite value ({}) at index {i}", v[i]),
            ));
        }
        Ok(v)
    };
    let mut loras = Vec::with_capacity(order.len());
    for module in order {
        let (kind, a, b) = factors[module];
        let (Some(a), Some(b)) = (a, b) else {
            let missing = if a.is_none() { "A" } else { "B" };
            return Err(Error::dump(
                &path,
                None,
                format!("module {module} has no lora_{missing} factor"),
            ));
        };
        let (av, bv) = (decode(a)?, decode(b)?);
        let rank = a.shape[0];
        if b.shape[1] != rank {
            return Err(Error::dump(
                &path,
                Some(&b.name),
                format!(
                    "shape {:?} does not pair with lora_A {:?}: the ranks differ",
                    b.shape, a.shape
                ),
            ));
        }
        let r = pattern_value(&config.rank_pattern, module, &config_path)?.unwrap_or(config.r);
        if r != rank {
            return Err(Error::dump(
                &path,
                Some(&a.name),
                format!("rank {rank}, but adapter_config.json says r = {r} for {module}"),
            ));
        }
        let alpha =
            pattern_value(&config.alpha_pattern, module, &config_path)?.unwrap_or(config.alpha);
        let scaling = if config.rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        loras.push(Lora {
            module: module.to_owned(),
            kind,
            rank,
            a: av,
            d_in: a.shape[1],
            b: bv,
            d_out: b.shape[0],
            scaling,
        });
    }
    Ok(Adapter {
        dir: dir.to_path_buf(),
        fan_in_fan_out: config.fan_in_fan_out,
        loras,
        full,
        path: path.clone(),
        map: Arc::new(map),
    })
}

// --------------------------------------------------------------------------- checkpoint

struct Shard {
    /// Relative to the checkpoint directory.
    rel: PathBuf,
    path: PathBuf,
    file: File,
    map: Mmap,
    tensors: Vec<TensorInfo>,
}

struct Checkpoint {
    shards: Vec<Shard>,
    model_type: Option<String>,
}

fn is_safetensors(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

fn open_shard(dir: &Path, rel: PathBuf) -> Result<Shard> {
    let path = dir.join(&rel);
    let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
    if file.metadata().map_err(|e| Error::io(&path, e))?.is_dir() {
        return Err(Error::dump(&path, None, "is a directory, expected a file"));
    }
    // SAFETY: read-only map; see source::MappedFile. A shard changed under us while we copy it
    // can fault, as with every mmap reader.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
    let tensors = parse_safetensors(&map, &path)?;
    Ok(Shard {
        rel,
        path,
        file,
        map,
        tensors,
    })
}

/// The shards of a checkpoint directory: the files named by `model.safetensors.index.json`,
/// or, without an index, every top-level `.safetensors` file.
fn open_checkpoint(dir: &Path) -> Result<Checkpoint> {
    let meta = fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: not a directory; merging reads a checkpoint directory (config.json + \
             .safetensors shards)",
            dir.display()
        )));
    }
    let index_path = dir.join(INDEX_FILE);
    let mut shards = Vec::new();
    if index_path.is_file() {
        let bytes = fs::read(&index_path).map_err(|e| Error::io(&index_path, e))?;
        let bad = |msg: String| Error::dump(&index_path, None, msg);
        let doc: Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let map = doc
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
        let mut names: Vec<&str> = Vec::new();
        for (tensor, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("weight_map[{tensor:?}] is not a file name")))?;
            let inside = !file.is_empty()
                && Path::new(file)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)));
            if !inside {
                return Err(bad(format!(
                    "shard path {file:?} leaves the checkpoint directory"
                )));
            }
            if !names.contains(&file) {
                names.push(file);
            }
        }
        names.sort_unstable();
        for name in names {
            shards.push(open_shard(dir, PathBuf::from(name))?);
        }
        for (tensor, file) in map {
            let shard = shards
                .iter()
                .find(|s| s.rel == Path::new(file.as_str().unwrap_or_default()))
                .expect("every file of the weight map was opened");
            if !shard.tensors.iter().any(|t| &t.name == tensor) {
                return Err(Error::dump(
                    &index_path,
                    Some(tensor),
                    format!(
                        "the index puts it in {} but that shard does not hold it",
                        shard.rel.display()
                    ),
                ));
            }
        }
    } else {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok())
            .map(|e| PathBuf::from(e.file_name()))
            .filter(|p| is_safetensors(p) && dir.join(p).is_file())
            .collect();
        files.sort();
        for rel in files {
            shards.push(open_shard(dir, rel)?);
        }
    }
    if shards.is_empty() {
        return Err(Error::dump(
            dir,
            None,
            "holds no .safetensors weights (model.safetensors or model.safetensors.index.json); \
             merging does not read .bin checkpoints",
        ));
    }
    let model_type = fs::read(dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v.get("model_type")?.as_str().map(str::to_owned));
    Ok(Checkpoint { shards, model_type })
}

// --------------------------------------------------------------------------- plan

/// One tensor to write: `W[i, :] + scaling · Σ_k left[i, k] · right[k, :]` (rank 0: `W`),
/// with `W` read from the checkpoint or, for a [`FullTensor`], from the adapter.
struct Target {
    shard: usize,
    /// The checkpoint tensor written (its place, dtype and shape in the output).
    tensor: TensorInfo,
    dtype: DType,
    /// Where `W` is read: `None` for the checkpoint, else (offset in the adapter file, dtype).
    from_adapter: Option<(usize, DType)>,
    rows: usize,
    cols: usize,
    rank: usize,
    /// `[rows, rank]`.
    left: Vec<f32>,
    /// `[rank, cols]`, as [`pack_blocks`] lays it out.
    right: Vec<f32>,
    scaling: f32,
    module: String,
    scaling_f64: f64,
}

fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = m[i * cols + j];
        }
    }
    t
}

/// The checkpoint tensor named `name`, else the one whose name ends with `.<name>` or is the
/// end of `name` after a dot (checkpoints saved from the base model class lack the `model.`
/// prefix, GPT-2's original files lack `transformer.`). `Err` lists the candidates (none or
/// several).
fn find_tensor<'a>(
    names: &'a HashMap<&str, Vec<usize>>,
    name: &str,
) -> std::result::Result<(&'a str, usize), Vec<&'a str>> {
    let pick = |n: &'a str, shards: &'a Vec<usize>| {
        if shards.len() == 1 {
            Ok((n, shards[0]))
        } else {
            Err(vec![n; shards.len()])
        }
    };
    if let Some((n, shards)) = names.get_key_value(name) {
        return pick(n, shards);
    }
    let (suffix, within) = (format!(".{name}"), |n: &str| {
        name.ends_with(&format!(".{n}"))
    });
    let mut found: Vec<(&str, &Vec<usize>)> = names
        .iter()
        .filter(|(n, _)| n.ends_with(&suffix) || within(n))
        .map(|(n, s)| (*n, s))
        .collect();
    found.sort_unstable();
    match found[..] {
        [(n, shards)] => pick(n, shards),
        _ => Err(found.into_iter().map(|(n, _)| n).collect()),
    }
}

fn tensor_info<'a>(ckpt: &'a Checkpoint, shard: usize, name: &str) -> &'a TensorInfo {
    ckpt.shards[shard]
        .tensors
        .iter()
        .find(|t| t.name == name)
        .expect("indexed tensor")
}

fn float_dtype(ckpt: &Checkpoint, shard: usize, t: &TensorInfo) -> Result<DType> {
    match t.stored {
        StoredType::Float(d) => Ok(d),
        other => Err(Error::dump(
            &ckpt.shards[shard].path,
            Some(&t.name),
            format!(
                "unsupported dtype {}: merging needs float32, float16 or bfloat16 weights \
                 (quantized checkpoints cannot be merged into)",
                other.name()
            ),
        )),
    }
}

/// The tensors to write, in file order. The factors move from `adapter` into the targets.
fn plan(adapter: &mut Adapter, ckpt: &Checkpoint, model_dir: &Path) -> Result<Vec<Target>> {
    let mut names: HashMap<&str, Vec<usize>> = HashMap::new();
    for (s, shard) in ckpt.shards.iter().enumerate() {
        for t in &shard.tensors {
            names.entry(t.name.as_str()).or_default().push(s);
        }
    }
    let conv1d_family = ckpt
        .model_type
        .as_deref()
        .is_some_and(|m| CONV1D_MODEL_TYPES.contains(&m));

    // Whole tensors of the adapter: checkpoint tensor -> (adapter tensor, shard).
    let mut full: HashMap<&str, (&FullTensor, usize)> = HashMap::new();
    for f in &adapter.full {
        let (name, s) = find_tensor(&names, &f.target).map_err(|candidates| {
            Error::dump(
                &adapter.path,
                Some(&f.key),
                if candidates.is_empty() {
                    format!(
                        "not a LoRA factor (lora_A/lora_B), and {} has no tensor {} for it to \
                         replace",
                        model_dir.display(),
                        f.target
                    )
                } else {
                    format!(
                        "not a LoRA factor, and it matches several tensors of {}: {}",
                        model_dir.display(),
                        candidates.join(", ")
                    )
                },
            )
        })?;
        let t = tensor_info(ckpt, s, name);
        float_dtype(ckpt, s, t)?;
        if t.shape != f.shape {
            return Err(Error::Invalid(format!(
                "adapter {}: {} is {:?} but {} [{name}] is {:?}; the adapter changes the shape (a \
                 resized vocabulary?) and merging keeps the checkpoint's shapes",
                adapter.dir.display(),
                f.key,
                f.shape,
                ckpt.shards[s].path.display(),
                t.shape
            )));
        }
        if full.insert(name, (f, s)).is_some() {
            return Err(Error::Invalid(format!(
                "adapter {}: two tensors replace checkpoint tensor {name}",
                adapter.dir.display()
            )));
        }
    }

    let mut seen: HashSet<&str> = HashSet::new();
    let mut targets = Vec::with_capacity(adapter.loras.len() + full.len());
    for lora in adapter.loras.iter_mut() {
        let (name, s) =
            find_tensor(&names, &format!("{}.weight", lora.module)).map_err(|candidates| {
                Error::Invalid(if candidates.is_empty() {
                    format!(
                        "adapter {} targets {} but the checkpoint {} has no tensor {}.weight: the \
                         adapter was made for another model",
                        adapter.dir.display(),
                        lora.module,
                        model_dir.display(),
                        lora.module
                    )
                } else {
                    format!(
                        "adapter {} targets {}, which matches several tensors of {}: {}",
                        adapter.dir.display(),
                        lora.module,
                        model_dir.display(),
                        candidates.join(", ")
                    )
                })
            })?;
        if !seen.insert(name) {
            return Err(Error::Invalid(format!(
                "adapter {}: two modules map to checkpoint tensor {name}",
                adapter.dir.display()
            )));
        }
        let shard = &ckpt.shards[s];
        let t = tensor_info(ckpt, s, name);
        let dtype = float_dtype(ckpt, s, t)?;
        let (d_out, d_in) = (lora.d_out, lora.d_in);
        let normal = t.shape == [d_out, d_in];
        let flipped = t.shape == [d_in, d_out];
        let transposed = match lora.kind {
            // lora_embedding_A is [r, num_embeddings], B [dim, r]; the weight [num_embeddings, dim].
            LoraKind::Embedding => flipped,
            // PEFT picks the orientation by the layer's class (nn.Linear or Conv1D); only a
            // square weight leaves the shape ambiguous.
            LoraKind::Linear if normal && flipped => {
                let last = lora.module.rsplit('.').next().unwrap_or_default();
                adapter.fan_in_fan_out || (conv1d_family && CONV1D_MODULES.contains(&last))
            }
            LoraKind::Linear => flipped,
        };
        let fits = match lora.kind {
            LoraKind::Linear => normal || flipped,
            LoraKind::Embedding => flipped,
        };
        if !fits {
            let want = match lora.kind {
                LoraKind::Linear => format!("[{d_out}, {d_in}] (or [{d_in}, {d_out}] for Conv1D)"),
                LoraKind::Embedding => format!("[{d_in}, {d_out}]"),
            };
            return Err(Error::Invalid(format!(
                "adapter {}: module {} has lora_A [{}, {d_in}] and lora_B [{d_out}, {}], so the \
                 weight should be {want}, but {} [{name}] is {:?}: the adapter was made for \
                 another model",
                adapter.dir.display(),
                lora.module,
                lora.rank,
                lora.rank,
                shard.path.display(),
                t.shape
            )));
        }
        let r = lora.rank;
        let (left, right) = if transposed {
            (transpose(&lora.a, r, d_in), transpose(&lora.b, d_out, r))
        } else {
            (std::mem::take(&mut lora.b), std::mem::take(&mut lora.a))
        };
        targets.push(Target {
            shard: s,
            tensor: t.clone(),
            dtype,
            from_adapter: full.remove(name).map(|(f, _)| (f.offset, f.dtype)),
            rows: t.shape[0],
            cols: t.shape[1],
            rank: r,
            left,
            right: pack_blocks(&right, r, t.shape[1]),
            scaling: lora.scaling as f32,
            module: lora.module.clone(),
            scaling_f64: lora.scaling,
        });
    }
    // Whole tensors without a LoRA are written as they are, in the checkpoint's dtype.
    for (name, (f, s)) in full {
        let t = tensor_info(ckpt, s, name);
        let rows = if t.shape.len() < 2 { 1 } else { t.shape[0] };
        let count: usize = t.shape.iter().product();
        targets.push(Target {
            shard: s,
            tensor: t.clone(),
            dtype: float_dtype(ckpt, s, t)?,
            from_adapter: Some((f.offset, f.dtype)),
            rows,
            cols: count.checked_div(rows).unwrap_or(0),
            rank: 0,
            left: Vec::new(),
            right: Vec::new(),
            scaling: 0.0,
            module: name.strip_suffix(".weight").unwrap_or(name).to_owned(),
            scaling_f64: 0.0,
        });
    }
    targets.sort_by_key(|t| (t.shard, t.tensor.offset));
    Ok(targets)
}

// --------------------------------------------------------------------------- arithmetic

/// Smallest magnitude that rounds to infinity in `dtype`.
fn overflow_limit(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => f32::INFINITY,
        // 65504 is the largest float16; halfway to the next power of two rounds up.
        DType::F16 => 65520.0,
        // The largest bfloat16 is 0x7f7f; f32 values from halfway above it round up.
        DType::BF16 => f32::from_bits(0x7f7f_8000),
    }
}

/// Rows merged together: each block of `right` is read once for all of them.
const GROUP: usize = 4;
/// Columns whose partial sums stay in registers across the rank (`GROUP × BLOCK` floats).
const BLOCK: usize = 16;

/// A group of up to [`GROUP`] rows of a target: dtypes, their rows of `left`, `right` and the
/// scaling.
struct Rows<'a> {
    src: DType,
    dst: DType,
    cols: usize,
    rank: usize,
    /// `[rows, rank]`.
    left: &'a [f32],
    /// `[rank, cols]`, as [`pack_blocks`] lays it out.
    right: &'a [f32],
    scaling: f32,
}

/// `right` (`[rank, cols]`) laid out in the order the kernel reads it: for each block of
/// [`BLOCK`] columns its `rank × BLOCK` values together (so block `c0 / BLOCK` starts at
/// `c0 · rank`), then the last `cols % BLOCK` columns as `[rank, cols % BLOCK]`.
fn pack_blocks(right: &[f32], rank: usize, cols: usize) -> Vec<f32> {
    let blocks = cols / BLOCK * BLOCK;
    let mut packed = Vec::with_capacity(right.len());
    for c0 in (0..blocks).step_by(BLOCK) {
        for k in 0..rank {
            packed.extend_from_slice(&right[k * cols + c0..k * cols + c0 + BLOCK]);
        }
    }
    for k in 0..rank {
        packed.extend_from_slice(&right[k * cols + blocks..(k + 1) * cols]);
    }
    packed
}

/// How one weight dtype is read and written (little-endian bytes), compiled into the loops
/// for each pair of dtypes.
trait Elem {
    const SIZE: usize;
    fn decode(b: &[u8]) -> f32;
    fn encode(v: f32, out: &mut [u8]);
    /// Eight weights to f32 lanes.
    ///
    /// # Safety
    /// `8 * SIZE` bytes readable at `p`; the CPU has AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const u8) -> __m256;
    /// Eight f32 lanes to weights, rounded as [`Elem::encode`] rounds.
    ///
    /// # Safety
    /// `8 * SIZE` bytes writable at `p`; the CPU has AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn store8(v: __m256, p: *mut u8);
    #[inline(always)]
    fn decode_block(w: &[u8]) -> [f32; BLOCK] {
        let mut x = [0f32; BLOCK];
        for (x, b) in x
            .iter_mut()
            .zip(w[..BLOCK * Self::SIZE].chunks_exact(Self::SIZE))
        {
            *x = Self::decode(b);
        }
        x
    }
    #[inline(always)]
    fn encode_block(v: &[f32; BLOCK], out: &mut [u8]) {
        for (&v, o) in v
            .iter()
            .zip(out[..BLOCK * Self::SIZE].chunks_exact_mut(Self::SIZE))
        {
            Self::encode(v, o);
        }
    }
}

struct F32;
struct Bf16;
struct F16;

impl Elem for F32 {
    const SIZE: usize = 4;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_loadu_ps(p.cast())
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn store8(v: __m256, p: *mut u8) {
        _mm256_storeu_ps(p.cast(), v)
    }
    #[inline(always)]
    fn decode(b: &[u8]) -> f32 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    #[inline(always)]
    fn encode(v: f32, out: &mut [u8]) {
        out.copy_from_slice(&v.to_le_bytes());
    }
}

impl Elem for Bf16 {
    const SIZE: usize = 2;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
    }
    /// [`bf16_bits`] on eight lanes.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn store8(v: __m256, p: *mut u8) {
        let b = _mm256_castps_si256(v);
        let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
        let bias = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff));
        let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(b, bias));
        let magnitude = _mm256_and_si256(b, _mm256_set1_epi32(0x7fff_ffff));
        let nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f80_0000));
        let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(0x0040));
        let h = _mm256_blendv_epi8(rounded, quiet, nan);
        let lo = _mm256_castsi256_si128(h);
        let hi = _mm256_extracti128_si256::<1>(h);
        _mm_storeu_si128(p.cast(), _mm_packus_epi32(lo, hi));
    }
    #[inline(always)]
    fn decode(b: &[u8]) -> f32 {
        f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
    }
    #[inline(always)]
    fn encode(v: f32, out: &mut [u8]) {
        out.copy_from_slice(&bf16_bits(v).to_le_bytes());
    }
}

impl Elem for F16 {
    const SIZE: usize = 2;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn store8(v: __m256, p: *mut u8) {
        _mm_storeu_si128(p.cast(), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v))
    }
    #[inline(always)]
    fn decode(b: &[u8]) -> f32 {
        half::f16::from_le_bytes([b[0], b[1]]).to_f32()
    }
    #[inline(always)]
    fn encode(v: f32, out: &mut [u8]) {
        out.copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
    }
    // `half`'s slice conversions use F16C where the CPU has it (runtime detection).
    #[inline(always)]
    fn decode_block(w: &[u8]) -> [f32; BLOCK] {
        let mut x = [0f32; BLOCK];
        decode_f32(DType::F16, &w[..BLOCK * 2], &mut x);
        x
    }
    #[inline(always)]
    fn encode_block(v: &[f32; BLOCK], out: &mut [u8]) {
        use half::slice::HalfFloatSliceExt;
        let mut h = [half::f16::ZERO; BLOCK];
        h.convert_from_f32_slice(v);
        for (o, h) in out[..BLOCK * 2].chunks_exact_mut(2).zip(h) {
            o.copy_from_slice(&h.to_le_bytes());
        }
    }
}

/// Merge a group of rows: `out = encode(w + scaling · left_rows · right)`, as PEFT does it
/// (`(B @ A) * scaling`, then `W += delta`): each product accumulated over the rank in order
/// with fused multiply-adds (as the BLAS behind torch's matmul does; the order may differ from
/// torch's, so the product may differ by float32 rounding), then scaled, then added; rank 0
/// re-encodes `w`. Returns the first row (within the group) where a finite weight became
/// non-finite in the output dtype.
fn merge_rows(spec: &Rows<'_>, w: &[u8], out: &mut [u8]) -> Option<usize> {
    use DType::{BF16 as B, F16 as H, F32 as S};
    match (spec.src, spec.dst) {
        (S, S) => merge_rows_as::<F32, F32>(spec, w, out),
        (S, B) => merge_rows_as::<F32, Bf16>(spec, w, out),
        (S, H) => merge_rows_as::<F32, F16>(spec, w, out),
        (B, S) => merge_rows_as::<Bf16, F32>(spec, w, out),
        (B, B) => merge_rows_as::<Bf16, Bf16>(spec, w, out),
        (B, H) => merge_rows_as::<Bf16, F16>(spec, w, out),
        (H, S) => merge_rows_as::<F16, F32>(spec, w, out),
        (H, B) => merge_rows_as::<F16, Bf16>(spec, w, out),
        (H, H) => merge_rows_as::<F16, F16>(spec, w, out),
    }
}

fn merge_rows_as<I: Elem, O: Elem>(spec: &Rows<'_>, w: &[u8], out: &mut [u8]) -> Option<usize> {
    let n = w.len() / (spec.cols * I::SIZE);
    if n == GROUP {
        return merge_group::<I, O>(spec, w, out);
    }
    // A short group (a tensor's last): padded with zero rows, whose results are dropped.
    let left = [spec.left, &vec![0.0; (GROUP - n) * spec.rank]].concat();
    let mut w_padded = vec![0u8; GROUP * spec.cols * I::SIZE];
    w_padded[..w.len()].copy_from_slice(w);
    let mut out_padded = vec![0u8; GROUP * spec.cols * O::SIZE];
    let padded = Rows {
        left: &left,
        ..*spec
    };
    let bad = merge_group::<I, O>(&padded, &w_padded, &mut out_padded);
    out.copy_from_slice(&out_padded[..out.len()]);
    bad
}

/// A full group of rows, in one pass: by blocks of [`BLOCK`] columns, the product of all its
/// rows stays in registers across the rank, then each row's weights are decoded, added to,
/// checked and encoded straight from the input to the output bytes (with AVX2 where the CPU
/// has it); the last columns go one weight at a time, in the same order.
fn merge_group<I: Elem, O: Elem>(spec: &Rows<'_>, w: &[u8], out: &mut [u8]) -> Option<usize> {
    let (cols, rank) = (spec.cols, spec.rank);
    let (row_in, row_out) = (cols * I::SIZE, cols * O::SIZE);
    assert!(w.len() == GROUP * row_in && out.len() == GROUP * row_out);
    assert!(spec.left.len() == GROUP * rank && spec.right.len() == rank * cols);
    let limit = overflow_limit(spec.dst);
    #[cfg(target_arch = "x86_64")]
    let (done, bad) = if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        // SAFETY: the CPU has AVX2, FMA and F16C, checked just above; the sizes are checked
        // above.
        unsafe { blocks_avx2::<I, O>(spec, w, out, limit) }
    } else {
        (0, false)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (done, bad) = (0, false);
    if !(merge_columns::<I, O>(spec, w, out, done, limit) | bad) {
        return None;
    }
    // Rare: the row is found again from the output, where a bad weight is not finite.
    let row = (0..GROUP).find(|&g| {
        (0..cols).any(|c| {
            let x = I::decode(&w[g * row_in + c * I::SIZE..]);
            let v = O::decode(&out[g * row_out + c * O::SIZE..]);
            x.is_finite() && !v.is_finite()
        })
    });
    debug_assert!(row.is_some());
    row
}

/// The portable loops of [`merge_group`], from column `from` (a multiple of [`BLOCK`]) on;
/// returns whether a finite weight became non-finite.
fn merge_columns<I: Elem, O: Elem>(
    spec: &Rows<'_>,
    w: &[u8],
    out: &mut [u8],
    from: usize,
    limit: f32,
) -> bool {
    let (cols, rank) = (spec.cols, spec.rank);
    let (row_in, row_out) = (cols * I::SIZE, cols * O::SIZE);
    let mut bad = false;
    let blocks = cols / BLOCK * BLOCK;
    for c0 in (from..blocks).step_by(BLOCK) {
        let t = if rank == 0 {
            [[0.0; BLOCK]; GROUP]
        } else {
            product_tile(spec.left, &spec.right[c0 * rank..(c0 + BLOCK) * rank], rank)
        };
        for (g, tg) in t.iter().enumerate() {
            let x = I::decode_block(&w[g * row_in + c0 * I::SIZE..]);
            let mut v = x;
            if rank > 0 {
                for ((v, &x), &p) in v.iter_mut().zip(&x).zip(tg) {
                    *v = x + p * spec.scaling;
                }
            }
            let mut lanes = 0u32;
            for (&x, &v) in x.iter().zip(&v) {
                lanes |= overflows(x, v, limit) as u32;
            }
            bad |= lanes != 0;
            O::encode_block(&v, &mut out[g * row_out + c0 * O::SIZE..]);
        }
    }
    let tail = &spec.right[blocks * rank..];
    for g in 0..GROUP {
        let l = &spec.left[g * rank..(g + 1) * rank];
        for c in blocks.max(from)..cols {
            let x = I::decode(&w[g * row_in + c * I::SIZE..]);
            let v = if rank == 0 {
                x
            } else {
                x + dot_column(l, tail, cols - blocks, c - blocks) * spec.scaling
            };
            bad |= overflows(x, v, limit);
            let at = g * row_out + c * O::SIZE;
            O::encode(v, &mut out[at..at + O::SIZE]);
        }
    }
    bad
}

/// Whether a finite weight `x` became `v`, which does not fit below `limit` (NaN compares
/// false, so it counts too).
#[inline(always)]
fn overflows(x: f32, v: f32, limit: f32) -> bool {
    let finite = x.to_bits() & 0x7f80_0000 != 0x7f80_0000;
    let fits = v.abs() < limit;
    finite & !fits
}

/// `Σ_k left[k] · right[k, c]`, accumulated over k in order with fused multiply-adds.
#[inline(always)]
fn dot_column(left: &[f32], right: &[f32], cols: usize, c: usize) -> f32 {
    let mut sum = left[0] * right[c];
    for (k, &l) in left.iter().enumerate().skip(1) {
        sum = l.mul_add(right[k * cols + c], sum);
    }
    sum
}

/// `left · block` for a group of rows (`left` is `[GROUP, rank]`, rank ≥ 1, `block` is
/// `[rank, BLOCK]`); within a column the sum runs over k in order, exactly as [`dot_column`]
/// computes it (without FMA in the CPU, `mul_add` is a library call: slow, but exact).
#[inline(always)]
fn product_tile(left: &[f32], block: &[f32], rank: usize) -> [[f32; BLOCK]; GROUP] {
    let mut t = [[0f32; BLOCK]; GROUP];
    let r0: &[f32; BLOCK] = block[..BLOCK].try_into().expect("block");
    for (g, tg) in t.iter_mut().enumerate() {
        let l = left[g * rank];
        for (tj, &r) in tg.iter_mut().zip(r0) {
            *tj = l * r;
        }
    }
    for k in 1..rank {
        let rk: &[f32; BLOCK] = block[k * BLOCK..(k + 1) * BLOCK].try_into().expect("block");
        for (g, tg) in t.iter_mut().enumerate() {
            let l = left[g * rank + k];
            for (tj, &r) in tg.iter_mut().zip(rk) {
                *tj = l.mul_add(r, *tj);
            }
        }
    }
    t
}

/// The column blocks of [`merge_group`] with AVX2 and FMA intrinsics (8 floats a step; the
/// compiler does not find the conversions by itself): the same operations in the same order,
/// so the results are bit for bit those of the portable loops. Returns the columns done and
/// whether a finite weight became non-finite.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; the sizes are those [`merge_group`] checks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn blocks_avx2<I: Elem, O: Elem>(
    spec: &Rows<'_>,
    w: &[u8],
    out: &mut [u8],
    limit: f32,
) -> (usize, bool) {
    let (cols, rank) = (spec.cols, spec.rank);
    let (row_in, row_out) = (cols * I::SIZE, cols * O::SIZE);
    let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
    let (lp, rp) = (spec.left.as_ptr(), spec.right.as_ptr());
    let scaling = _mm256_set1_ps(spec.scaling);
    let limit = _mm256_set1_ps(limit);
    let inf = _mm256_set1_ps(f32::INFINITY);
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    let blocks = cols / BLOCK * BLOCK;
    for c0 in (0..blocks).step_by(BLOCK) {
        let mut t = [[_mm256_setzero_ps(); 2]; GROUP];
        if rank > 0 {
            let r = rp.add(c0 * rank);
            let (r0, r1) = (_mm256_loadu_ps(r), _mm256_loadu_ps(r.add(8)));
            for (g, tg) in t.iter_mut().enumerate() {
                let l = _mm256_broadcast_ss(&*lp.add(g * rank));
                *tg = [_mm256_mul_ps(l, r0), _mm256_mul_ps(l, r1)];
            }
            for k in 1..rank {
                let r = rp.add(c0 * rank + k * BLOCK);
                let (r0, r1) = (_mm256_loadu_ps(r), _mm256_loadu_ps(r.add(8)));
                for (g, tg) in t.iter_mut().enumerate() {
                    let l = _mm256_broadcast_ss(&*lp.add(g * rank + k));
                    tg[0] = _mm256_fmadd_ps(l, r0, tg[0]);
                    tg[1] = _mm256_fmadd_ps(l, r1, tg[1]);
                }
            }
        }
        for (g, tg) in t.iter().enumerate() {
            for (h, &p) in tg.iter().enumerate() {
                let c = c0 + 8 * h;
                let x = I::load8(wp.add(g * row_in + c * I::SIZE));
                let v = if rank > 0 {
                    _mm256_add_ps(x, _mm256_mul_ps(p, scaling))
                } else {
                    x
                };
                // Fine where the weight is not finite or the result fits (NaN does not).
                let x_inf = _mm256_cmp_ps::<_CMP_NLT_UQ>(_mm256_and_ps(x, abs), inf);
                let fits = _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_and_ps(v, abs), limit);
                ok = _mm256_and_ps(ok, _mm256_or_ps(x_inf, fits));
                O::store8(v, op.add(g * row_out + c * O::SIZE));
            }
        }
    }
    (blocks, _mm256_movemask_ps(ok) != 0xff)
}

/// bfloat16 bits of `v`, rounded to nearest even as torch does (NaN stays a quiet NaN);
/// branch-free so that the loop vectorizes.
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = b & 0x7fff_ffff > 0x7f80_0000;
    if nan {
        (b >> 16) as u16 | 0x0040
    } else {
        rounded
    }
}

// --------------------------------------------------------------------------- writing

fn check_cancel(progress: &Progress) -> Result<()> {
    if progress.cancel.load(Ordering::Relaxed) {
        Err(Error::Cancelled)
    } else {
        Ok(())
    }
}

/// Copy `len` bytes of `src` from `start` to the end of `out`, in pieces, in the kernel where
/// the platform can.
fn copy_range(
    src: &File,
    src_path: &Path,
    start: u64,
    len: u64,
    out: &mut File,
    out_path: &Path,
    progress: &Progress,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let mut reader = src;
    reader
        .seek(SeekFrom::Start(start))
        .map_err(|e| Error::io(src_path, e))?;
    let mut left = len;
    while left > 0 {
        check_cancel(progress)?;
        let piece = left.min(COPY_PIECE);
        let n = io::copy(&mut reader.take(piece), out).map_err(|e| Error::io(out_path, e))?;
        if n != piece {
            return Err(Error::dump(
                src_path,
                None,
                format!(
                    "ended {} bytes early (truncated while being read?)",
                    piece - n
                ),
            ));
        }
        left -= n;
        progress.done.fetch_add(n, Ordering::Relaxed);
    }
    Ok(())
}

/// What the writer thread of a shard appends to it next.
enum Piece {
    /// Bytes `[start, start + len)` of the input shard, copied as they are.
    Copy { start: u64, len: u64 },
    /// The first `len` bytes of a computed buffer, which then goes back for reuse.
    Merged(Vec<u8>, usize),
}

/// Chunk buffers circulating between the computing side and the writer: one being computed,
/// one queued, one being written.
const BUFFERS: usize = 3;

/// Write one output shard: the writer thread appends the pieces in order (untouched ranges
/// copied, merged chunks written) while this thread computes the next chunks, rows in
/// parallel. Writing into the page cache costs about as much as the arithmetic, and the two
/// overlap, across targets too (a copy between two targets overlaps the second's first chunks).
fn write_shard(
    shard: &Shard,
    adapter: &Adapter,
    targets: &[&Target],
    dst: &Path,
    progress: &Progress,
) -> Result<()> {
    let mut out = create_file(dst)?;
    let (to_writer, pieces) = mpsc::sync_channel::<Piece>(BUFFERS);
    let (to_compute, free) = mpsc::sync_channel::<Vec<u8>>(BUFFERS);
    for _ in 0..BUFFERS {
        to_compute.send(Vec::new()).expect("the receiver is here");
    }
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<File> {
            for piece in pieces {
                match piece {
                    Piece::Copy { start, len } => copy_range(
                        &shard.file,
                        &shard.path,
                        start,
                        len,
                        &mut out,
                        dst,
                        progress,
                    )?,
                    Piece::Merged(buf, len) => {
                        out.write_all(&buf[..len]).map_err(|e| Error::io(dst, e))?;
                        progress.done.fetch_add(len as u64, Ordering::Relaxed);
                        // The computing side may have stopped (an error): nothing more to do.
                        let _ = to_compute.send(buf);
                    }
                }
            }
            Ok(out)
        });
        let computed = (|| -> Result<()> {
            let mut pos = 0u64;
            for t in targets {
                let start = t.tensor.offset as u64;
                let copy = Piece::Copy {
                    start: pos,
                    len: start - pos,
                };
                // The writer stopped (an error, reported below).
                if to_writer.send(copy).is_err()
                    || !compute_merged(shard, adapter, t, &to_writer, &free, progress)?
                {
                    return Ok(());
                }
                pos = start + t.tensor.nbytes as u64;
            }
            let len = shard.map.len() as u64 - pos;
            let _ = to_writer.send(Piece::Copy { start: pos, len });
            Ok(())
        })();
        drop(to_writer);
        let wrote = writer
            .join()
            .unwrap_or_else(|_| Err(Error::Invalid("internal error: the writer panicked".into())));
        computed?;
        let perms = shard
            .file
            .metadata()
            .map_err(|e| Error::io(&shard.path, e))?
            .permissions();
        finish_file(wrote?, dst, perms)
    })
}

/// Compute a target chunk by chunk of whole rows (in parallel, by groups of rows) and send the
/// chunks to the writer. Returns false when the writer stopped.
fn compute_merged(
    shard: &Shard,
    adapter: &Adapter,
    t: &Target,
    to_writer: &mpsc::SyncSender<Piece>,
    free: &mpsc::Receiver<Vec<u8>>,
    progress: &Progress,
) -> Result<bool> {
    let (map, base, src) = match t.from_adapter {
        None => (&shard.map, t.tensor.offset, t.dtype),
        Some((offset, dtype)) => (&*adapter.map, offset, dtype),
    };
    let row_out = t.cols * t.dtype.size();
    let row_in = t.cols * src.size();
    if row_out == 0 || t.rows == 0 {
        return Ok(true);
    }
    // Whole groups of rows per chunk (only a tensor's last group may be short).
    let chunk_rows = (CHUNK_BYTES / row_out.max(row_in)).clamp(1, t.rows);
    let chunk_rows = if chunk_rows >= GROUP {
        chunk_rows / GROUP * GROUP
    } else {
        chunk_rows
    };
    for r0 in (0..t.rows).step_by(chunk_rows) {
        check_cancel(progress)?;
        // The writer hands buffers back until it fails; its error is reported by the caller.
        let Ok(mut buf) = free.recv() else {
            return Ok(false);
        };
        let r1 = (r0 + chunk_rows).min(t.rows);
        let (begin, end) = (base + r0 * row_in, base + r1 * row_in);
        let len = (r1 - r0) * row_out;
        if buf.len() < len {
            buf.resize(len.max(CHUNK_BYTES), 0);
        }
        let overflow = buf[..len]
            .par_chunks_mut(GROUP * row_out)
            .zip(map[begin..end].par_chunks(GROUP * row_in))
            .enumerate()
            .map(|(i, (o, w))| {
                let row = r0 + i * GROUP;
                let n = w.len() / row_in;
                let spec = Rows {
                    src,
                    dst: t.dtype,
                    cols: t.cols,
                    rank: t.rank,
                    left: &t.left[row * t.rank..(row + n) * t.rank],
                    right: &t.right,
                    scaling: t.scaling,
                };
                merge_rows(&spec, w, o).map(|g| row + g)
            })
            .flatten()
            .min();
        release_pages(map, begin, end);
        if let Some(row) = overflow {
            return Err(Error::Invalid(format!(
                "{} [{}]: W + scaling·B·A overflows {} in row {row} (module {}, scaling {}); \
                 the adapter is too large for this checkpoint's dtype",
                shard.path.display(),
                t.tensor.name,
                t.dtype.name(),
                t.module,
                t.scaling_f64
            )));
        }
        if to_writer.send(Piece::Merged(buf, len)).is_err() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Drop the whole pages of `[begin, end)` from the resident set (they stay in the page
/// cache), so that memory stays flat however large the merged tensors.
fn release_pages(map: &Mmap, begin: usize, end: usize) {
    const PAGE: usize = 4096;
    let start = begin.div_ceil(PAGE) * PAGE;
    let stop = end / PAGE * PAGE;
    if stop > start {
        // SAFETY: the map is private and read-only; dropping clean file-backed pages only
        // means they are read again (from the page cache) if touched later.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, stop - start)
        };
    }
}

fn create_file(path: &Path) -> Result<File> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

fn finish_file(out: File, path: &Path, perms: fs::Permissions) -> Result<()> {
    out.set_permissions(perms).map_err(|e| Error::io(path, e))
}

/// Every file and directory under `dir` except the shards and [`SKIPPED_ENTRIES`], relative
/// to `dir`, parents before children. Symbolic links are followed (hub cache snapshots are
/// links into a blob store).
fn other_entries(dir: &Path, shards: &HashSet<&Path>) -> Result<Vec<(PathBuf, bool, u64)>> {
    const MAX_DEPTH: usize = 32;
    let mut out = Vec::new();
    let mut stack = vec![(PathBuf::new(), 0usize)];
    while let Some((rel, depth)) = stack.pop() {
        let here = dir.join(&rel);
        if depth > MAX_DEPTH {
            return Err(Error::dump(
                &here,
                None,
                format!("nested more than {MAX_DEPTH} directories deep (a symbolic link loop?)"),
            ));
        }
        let mut entries: Vec<PathBuf> = fs::read_dir(&here)
            .map_err(|e| Error::io(&here, e))?
            .map(|e| e.map(|e| rel.join(e.file_name())))
            .collect::<io::Result<_>>()
            .map_err(|e| Error::io(&here, e))?;
        entries.sort();
        for r in entries.into_iter().rev() {
            if depth == 0 && SKIPPED_ENTRIES.iter().any(|s| r.as_os_str() == *s) {
                continue;
            }
            if shards.contains(r.as_path()) {
                continue;
            }
            let p = dir.join(&r);
            let meta = fs::metadata(&p).map_err(|e| Error::io(&p, e))?;
            if meta.is_dir() {
                out.push((r.clone(), true, 0));
                stack.push((r, depth + 1));
            } else {
                out.push((r, false, meta.len()));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn copy_file(src: &Path, dst: &Path, progress: &Progress) -> Result<()> {
    let f = File::open(src).map_err(|e| Error::io(src, e))?;
    let meta = f.metadata().map_err(|e| Error::io(src, e))?;
    let mut out = create_file(dst)?;
    copy_range(&f, src, 0, meta.len(), &mut out, dst, progress)?;
    finish_file(out, dst, meta.permissions())
}

// --------------------------------------------------------------------------- output directory

/// `path` made absolute with symbolic links resolved as far as it exists.
fn resolved(path: &Path) -> PathBuf {
    if let Ok(p) = fs::canonicalize(path) {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => resolved(parent).join(name),
        _ => std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
    }
}

fn check_out_dir(out: &Path, model_dir: &Path, adapter: &Path, overwrite: bool) -> Result<()> {
    if out.file_name().is_none() {
        return Err(Error::Invalid(format!(
            "{}: the output must be a new directory's path",
            out.display()
        )));
    }
    let (o, m, a) = (resolved(out), resolved(model_dir), resolved(adapter));
    if o.starts_with(&m) || m.starts_with(&o) {
        return Err(Error::Invalid(format!(
            "the output {} and the checkpoint {} must not contain each other",
            out.display(),
            model_dir.display()
        )));
    }
    if a.starts_with(&o) {
        return Err(Error::Invalid(format!(
            "the adapter {} is inside the output {}; refusing to replace it",
            adapter.display(),
            out.display()
        )));
    }
    let Ok(meta) = fs::symlink_metadata(out) else {
        return Ok(());
    };
    if !overwrite {
        return Err(Error::Invalid(format!(
            "{} already exists; pass overwrite=True (--overwrite) to replace it",
            out.display()
        )));
    }
    if !meta.is_dir() {
        return Err(Error::Invalid(format!(
            "{} exists and is not a directory; refusing to replace it",
            out.display()
        )));
    }
    let mut entries = fs::read_dir(out).map_err(|e| Error::io(out, e))?.peekable();
    let looks_like_checkpoint = out.join("config.json").is_file()
        || fs::read_dir(out)
            .map_err(|e| Error::io(out, e))?
            .filter_map(|e| e.ok())
            .any(|e| is_safetensors(Path::new(&e.file_name())));
    if entries.peek().is_some() && !looks_like_checkpoint {
        return Err(Error::Invalid(format!(
            "{} is a non-empty directory that is not a checkpoint; refusing to replace it",
            out.display()
        )));
    }
    Ok(())
}

fn sibling(out: &Path, tag: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    parent.join(format!(
        ".{name}.{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A directory removed (with everything in it) when dropped, unless it was kept.
struct TempDir(Option<PathBuf>);

impl TempDir {
    fn path(&self) -> &Path {
        self.0.as_deref().expect("temporary directory")
    }
    fn keep(mut self) -> PathBuf {
        self.0.take().expect("temporary directory")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_dir_all(p);
        }
    }
}

/// Move the finished `tmp` to `out`, replacing an old `out` (already checked) when there is one.
fn install(tmp: TempDir, out: &Path) -> Result<()> {
    if fs::symlink_metadata(out).is_ok() {
        let old = sibling(out, "old");
        fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
        if let Err(e) = fs::rename(tmp.path(), out) {
            let _ = fs::rename(&old, out);
            return Err(Error::io(out, e));
        }
        tmp.keep();
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(tmp.path(), out).map_err(|e| Error::io(out, e))?;
        tmp.keep();
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

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
    use crate::dtype::encode_f32;
    use serde_json::json;

    type Spec<'a> = (&'a str, &'a str, Vec<usize>, Vec<u8>);

    /// A safetensors file holding `tensors` (name, dtype tag, shape, raw bytes) in this order.
    fn write_st(path: &Path, tensors: &[Spec<'_>]) {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut data = Vec::new();
        for (name, tag, shape, bytes) in tensors {
            let begin = data.len();
            data.extend_from_slice(bytes);
            header.insert(
                (*name).into(),
                json!({"dtype": tag, "shape": shape, "data_offsets": [begin, data.len()]}),
            );
        }
        let mut head = serde_json::to_vec(&Value::Object(header)).unwrap();
        head.resize(head.len().next_multiple_of(8), b' ');
        let mut out = (head.len() as u64).to_le_bytes().to_vec();
        out.extend(head);
        out.extend(data);
        fs::write(path, out).unwrap();
    }

    fn enc(dtype: DType, v: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_f32(dtype, v, &mut out);
        out
    }

    fn dec(dtype: DType, b: &[u8]) -> Vec<f32> {
        let mut v = vec![0f32; b.len() / dtype.size()];
        decode_f32(dtype, b, &mut v);
        v
    }

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn tensor(
        name: &str,
        dtype: DType,
        shape: &[usize],
        seed: u64,
    ) -> (String, DType, Vec<usize>, Vec<f32>) {
        // Values the dtype represents exactly, so that they are what the merge reads.
        let v = dec(dtype, &enc(dtype, &values(shape.iter().product(), seed)));
        (name.into(), dtype, shape.to_vec(), v)
    }

    fn write_tensors(path: &Path, ts: &[(String, DType, Vec<usize>, Vec<f32>)]) {
        let specs: Vec<Spec<'_>> = ts
            .iter()
            .map(|(n, d, s, v)| (n.as_str(), d.safetensors_tag(), s.clone(), enc(*d, v)))
            .collect();
        write_st(path, &specs);
    }

    fn lora_config(r: usize, alpha: f64) -> Value {
        json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
            "bias": "none", "fan_in_fan_out": false, "use_rslora": false, "use_dora": false,
            "rank_pattern": {}, "alpha_pattern": {},
        })
    }

    /// An adapter directory: config + `(module, A [r, d_in], B [d_out, r])` as f32.
    /// `target_modules` is the modules written unless `config` names them.
    fn write_adapter(dir: &Path, config: &Value, loras: &[(&str, Vec<usize>, Vec<usize>)]) {
        fs::create_dir_all(dir).unwrap();
        let mut config = config.clone();
        if config.get("target_modules").is_none() {
            config["target_modules"] = json!(loras.iter().map(|l| l.0).collect::<Vec<_>>());
        }
        fs::write(
            dir.join(ADAPTER_CONFIG),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
        let mut ts = Vec::new();
        for (i, (m, a, b)) in loras.iter().enumerate() {
            let seed = 100 + i as u64;
            ts.push(tensor(
                &format!("{PEFT_PREFIX}{m}.lora_A.weight"),
                DType::F32,
                a,
                seed,
            ));
            ts.push(tensor(
                &format!("{PEFT_PREFIX}{m}.lora_B.weight"),
                DType::F32,
                b,
                seed + 50,
            ));
        }
        write_tensors(&dir.join(ADAPTER_WEIGHTS), &ts);
    }

    fn read_tensor(path: &Path, name: &str) -> (DType, Vec<usize>, Vec<u8>) {
        let buf = fs::read(path).unwrap();
        let t = parse_safetensors(&buf, path)
            .unwrap()
            .into_iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("{name} not in {}", path.display()));
        let StoredType::Float(d) = t.stored else {
            panic!("not float")
        };
        (
            d,
            t.shape.clone(),
            buf[t.offset..t.offset + t.nbytes].to_vec(),
        )
    }

    /// `W + s·B·A` (or its transpose), as the merge computes it in f32 (the product accumulated
    /// over the rank in order with fused multiply-adds), then encoded.
    fn expected(
        w: &[f32],
        a: &[f32],
        b: &[f32],
        r: usize,
        s: f32,
        transposed: bool,
        dt: DType,
    ) -> Vec<u8> {
        let d_in = a.len() / r;
        let d_out = b.len() / r;
        let mut out = w.to_vec();
        for i in 0..d_out {
            for j in 0..d_in {
                let mut acc = b[i * r] * a[j];
                for k in 1..r {
                    acc = b[i * r + k].mul_add(a[k * d_in + j], acc);
                }
                let idx = if transposed {
                    j * d_out + i
                } else {
                    i * d_in + j
                };
                // The f64 product is the truth; f32 may differ by rounding only.
                let exact: f64 = (0..r)
                    .map(|k| b[i * r + k] as f64 * a[k * d_in + j] as f64)
                    .sum();
                assert!((acc as f64 - exact).abs() <= 1e-6 * (1.0 + exact.abs()));
                out[idx] = w[idx] + acc * s;
            }
        }
        enc(dt, &out)
    }

    struct Fixture {
        _root: tempfile::TempDir,
        model: PathBuf,
        adapter: PathBuf,
        out: PathBuf,
        shard1: Vec<(String, DType, Vec<usize>, Vec<f32>)>,
        shard2: Vec<(String, DType, Vec<usize>, Vec<f32>)>,
    }

    const SHARD1: &str = "model-00001-of-00002.safetensors";
    const SHARD2: &str = "model-00002-of-00002.safetensors";

    /// A two-shard checkpoint (f32, bf16 and f16 weights, an int64 buffer, an index, config,
    /// tokenizer, a nested file and a .git directory) and an r = 2, alpha = 4 adapter on three
    /// of its weights and the large lm_head (two chunks).
    fn fixture() -> Fixture {
        let root = tempfile::tempdir().unwrap();
        let model = root.path().join("model");
        fs::create_dir_all(model.join("sub")).unwrap();
        fs::create_dir_all(model.join(".git")).unwrap();
        let shard1 = vec![
            tensor("model.embed_tokens.weight", DType::F32, &[10, 6], 1),
            tensor(
                "model.layers.0.self_attn.o_proj.weight",
                DType::F32,
                &[6, 6],
                2,
            ),
            tensor(
                "model.layers.0.mlp.down_proj.weight",
                DType::BF16,
                &[7, 40],
                3,
            ),
            tensor("model.norm.weight", DType::F32, &[6], 4),
        ];
        let shard2 = vec![
            tensor(
                "model.layers.1.self_attn.o_proj.weight",
                DType::F16,
                &[6, 6],
                5,
            ),
            tensor("lm_head.weight", DType::F32, &[2100, 1024], 6),
            tensor(
                "model.layers.1.mlp.down_proj.weight",
                DType::BF16,
                &[6, 8],
                7,
            ),
        ];
        write_tensors(&model.join(SHARD1), &shard1);
        // An int64 buffer in the middle of the second shard.
        let mut specs: Vec<Spec<'_>> = shard2
            .iter()
            .map(|(n, d, s, v)| (n.as_str(), d.safetensors_tag(), s.clone(), enc(*d, v)))
            .collect();
        specs.insert(
            1,
            (
                "position_ids",
                "I64",
                vec![3],
                [7i64, 8, 9].iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
        );
        write_st(&model.join(SHARD2), &specs);
        let mut weight_map = serde_json::Map::new();
        for (n, ..) in &shard1 {
            weight_map.insert(n.clone(), json!(SHARD1));
        }
        for n in shard2.iter().map(|t| t.0.as_str()).chain(["position_ids"]) {
            weight_map.insert(n.into(), json!(SHARD2));
        }
        fs::write(
            model.join(INDEX_FILE),
            serde_json::to_vec_pretty(
                &json!({"metadata": {"total_size": 1}, "weight_map": weight_map}),
            )
            .unwrap(),
        )
        .unwrap();
        fs::write(model.join("config.json"), br#"{"model_type": "llama"}"#).unwrap();
        fs::write(model.join("tokenizer.json"), b"{\"tok\": 1}").unwrap();
        fs::write(model.join("sub").join("notes.txt"), b"nested").unwrap();
        fs::write(model.join(".git").join("HEAD"), b"ref").unwrap();
        let adapter = root.path().join("adapter");
        write_adapter(
            &adapter,
            &lora_config(2, 4.0),
            &[
                ("model.layers.0.self_attn.o_proj", vec![2, 6], vec![6, 2]),
                ("model.layers.0.mlp.down_proj", vec![2, 40], vec![7, 2]),
                ("model.layers.1.self_attn.o_proj", vec![2, 6], vec![6, 2]),
                ("lm_head", vec![2, 1024], vec![2100, 2]),
            ],
        );
        let out = root.path().join("out").join("merged");
        Fixture {
            model,
            adapter,
            out,
            shard1,
            shard2,
            _root: root,
        }
    }

    fn run(f: &Fixture, overwrite: bool) -> Result<MergeSummary> {
        merge(
            &f.model,
            &f.adapter,
            &f.out,
            &MergeOptions { overwrite },
            &Progress::default(),
        )
    }

    /// Nothing at `out`, and no temporary entry next to it.
    fn assert_clean(out: &Path) {
        assert!(!out.exists(), "{} exists", out.display());
        if let Ok(entries) = fs::read_dir(out.parent().unwrap()) {
            let names: Vec<_> = entries.map(|e| e.unwrap().file_name()).collect();
            assert!(names.is_empty(), "left behind: {names:?}");
        }
    }

    fn adapter_factor(f: &Fixture, module: &str, factor: &str) -> Vec<f32> {
        let (d, _, b) = read_tensor(
            &f.adapter.join(ADAPTER_WEIGHTS),
            &format!("{PEFT_PREFIX}{module}.{factor}.weight"),
        );
        dec(d, &b)
    }

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

    #[test]
    fn scaling_follows_peft_patterns_and_rslora() {
        let f = fixture();
        let mut config = lora_config(2, 4.0);
        config["rank_pattern"] = json!({"lm_head": 4});
        config["alpha_pattern"] = json!({"layers\\.1\\..*o_proj": 3.0, "o_proj": 10.0});
        write_adapter(
            &f.adapter,
            &config,
            &[
                ("model.layers.0.self_attn.o_proj", vec![2, 6], vec![6, 2]),
                ("model.layers.1.self_attn.o_proj", vec![2, 6], vec![6, 2]),
                ("lm_head", vec![4, 1024], vec![2100, 4]),
            ],
        );
        let scalings = |a: &Adapter| -> Vec<f64> { a.loras.iter().map(|l| l.scaling).collect() };
        assert_eq!(
            scalings(&read_adapter(&f.adapter).unwrap()),
            [5.0, 1.5, 1.0]
        );
        config["use_rslora"] = json!(true);
        fs::write(
            f.adapter.join(ADAPTER_CONFIG),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
        let s = scalings(&read_adapter(&f.adapter).unwrap());
        assert_eq!(s, [10.0 / 2f64.sqrt(), 3.0 / 2f64.sqrt(), 2.0]);
        // The merge applies them.
        let summary = run(&f, false).unwrap();
        let (_, _, got) = read_tensor(
            &f.out.join(SHARD2),
            "model.layers.1.self_attn.o_proj.weight",
        );
        let m = "model.layers.1.self_attn.o_proj";
        let w = &f.shard2[0].3;
        let want = expected(
            w,
            &adapter_factor(&f, m, "lora_A"),
            &adapter_factor(&f, m, "lora_B"),
            2,
            s[1] as f32,
            false,
            DType::F16,
        );
        assert_eq!(got, want);
        assert_eq!(
            summary
                .merged
                .iter()
                .find(|t| t.module == m)
                .unwrap()
                .scaling,
            s[1]
        );
        // A pattern Rust's regex engine cannot run is a clear error.
        config["alpha_pattern"] = json!({"(?<=x)o_proj": 1.0});
        fs::write(
            f.adapter.join(ADAPTER_CONFIG),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
        assert!(read_adapter(&f.adapter)
            .unwrap_err()
            .to_string()
            .contains("regular expression"));
    }

    #[test]
    fn conv1d_fan_in_fan_out_embeddings_and_prefix_fallback() {
        let root = tempfile::tempdir().unwrap();
        let model = root.path().join("gpt2");
        fs::create_dir_all(&model).unwrap();
        // GPT-2's original files name tensors without the `transformer.` prefix.
        let ts = vec![
            tensor("h.0.attn.c_attn.weight", DType::F32, &[4, 12], 1),
            tensor("h.0.attn.c_proj.weight", DType::BF16, &[4, 4], 2),
            tensor("wte.weight", DType::F32, &[10, 4], 3),
        ];
        write_tensors(&model.join("model.safetensors"), &ts);
        fs::write(model.join("config.json"), br#"{"model_type": "gpt2"}"#).unwrap();
        let adapter = root.path().join("adapter");
        let mut config = lora_config(2, 2.0);
        config["target_modules"] = json!(["c_attn", "c_proj", "wte"]);
        write_adapter(
            &adapter,
            &config,
            &[
                ("transformer.h.0.attn.c_attn", vec![2, 4], vec![12, 2]),
                ("transformer.h.0.attn.c_proj", vec![2, 4], vec![4, 2]),
            ],
        );
        // An embedding LoRA (parameters without `.weight`), added to the same file.
        let mut all: Vec<(String, DType, Vec<usize>, Vec<f32>)> = Vec::new();
        for m in ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"] {
            for fac in ["lora_A", "lora_B"] {
                let name = format!("{PEFT_PREFIX}{m}.{fac}.weight");
                let (d, shape, b) = read_tensor(&adapter.join(ADAPTER_WEIGHTS), &name);
                all.push((name, d, shape, dec(d, &b)));
            }
        }
        all.push(tensor(
            "base_model.model.transformer.wte.lora_embedding_A",
            DType::F32,
            &[2, 10],
            40,
        ));
        all.push(tensor(
            "base_model.model.transformer.wte.lora_embedding_B",
            DType::F32,
            &[4, 2],
            41,
        ));
        write_tensors(&adapter.join(ADAPTER_WEIGHTS), &all);
        let out = root.path().join("merged");
        let s = merge(
            &model,
            &adapter,
            &out,
            &MergeOptions::default(),
            &Progress::default(),
        )
        .unwrap();
        assert_eq!(s.merged.len(), 3);
        let pairs = [(0usize, 0usize, 1usize), (1, 2, 3), (2, 4, 5)];
        for (t, ai, bi) in pairs {
            let (name, dtype, _, w) = &ts[t];
            let (_, _, got) = read_tensor(&out.join("model.safetensors"), name);
            let want = expected(w, &all[ai].3, &all[bi].3, 2, 1.0, true, *dtype);
            assert_eq!(got, want, "{name}");
        }
        // Outside the Conv1D families a square weight is an nn.Linear.
        fs::write(model.join("config.json"), br#"{"model_type": "llama"}"#).unwrap();
        fs::remove_dir_all(&out).unwrap();
        merge(
            &model,
            &adapter,
            &out,
            &MergeOptions::default(),
            &Progress::default(),
        )
        .unwrap();
        let (name, dtype, _, w) = &ts[1];
        let (_, _, got) = read_tensor(&out.join("model.safetensors"), name);
        assert_eq!(
            got,
            expected(w, &all[2].3, &all[3].3, 2, 1.0, false, *dtype)
        );
    }

    #[test]
    fn whole_tensors_of_the_adapter_replace_the_checkpoints() {
        let f = fixture();
        let p = PEFT_PREFIX;
        let (a, b) = (
            tensor(
                &format!("{p}model.embed_tokens.lora_embedding_A"),
                DType::F32,
                &[2, 10],
                70,
            ),
            tensor(
                &format!("{p}model.embed_tokens.lora_embedding_B"),
                DType::F32,
                &[6, 2],
                71,
            ),
        );
        // PEFT's save_embedding_layers, a modules_to_save copy in another dtype (rounded to the
        // checkpoint's bf16) and a 1-D one.
        let base = tensor(
            &format!("{p}model.embed_tokens.base_layer.weight"),
            DType::F32,
            &[10, 6],
            72,
        );
        let down = tensor(
            &format!("{p}model.layers.1.mlp.down_proj.modules_to_save.weight"),
            DType::F32,
            &[6, 8],
            73,
        );
        let norm = tensor(
            &format!("{p}model.norm.modules_to_save.weight"),
            DType::BF16,
            &[6],
            74,
        );
        fs::write(
            f.adapter.join(ADAPTER_CONFIG),
            serde_json::to_vec(&lora_config(2, 2.0)).unwrap(),
        )
        .unwrap();
        write_tensors(
            &f.adapter.join(ADAPTER_WEIGHTS),
            &[
                a.clone(),
                b.clone(),
                base.clone(),
                down.clone(),
                norm.clone(),
            ],
        );
        let s = run(&f, false).unwrap();
        let summary: Vec<(&str, usize, bool)> = s
            .merged
            .iter()
            .map(|t| (t.tensor.as_str(), t.rank, t.from_adapter))
            .collect();
        assert_eq!(
            summary,
            [
                ("model.embed_tokens.weight", 2, true),
                ("model.norm.weight", 0, true),
                ("model.layers.1.mlp.down_proj.weight", 0, true)
            ]
        );
        let got = |shard: &str, name: &str| read_tensor(&f.out.join(shard), name).2;
        assert_eq!(
            got(SHARD1, "model.embed_tokens.weight"),
            expected(&base.3, &a.3, &b.3, 2, 1.0, true, DType::F32)
        );
        assert_eq!(got(SHARD1, "model.norm.weight"), enc(DType::F32, &norm.3));
        assert_eq!(
            got(SHARD2, "model.layers.1.mlp.down_proj.weight"),
            enc(DType::BF16, &down.3)
        );
        assert_eq!(
            got(SHARD1, "model.layers.0.mlp.down_proj.weight"),
            read_tensor(&f.model.join(SHARD1), "model.layers.0.mlp.down_proj.weight").2
        );
    }

    /// The AVX2 loops (where the CPU has them) and the portable ones give the same bytes, for
    /// every pair of dtypes, with and without a product, with and without overflow.
    #[test]
    fn kernel_paths_agree() {
        fn check<I: Elem, O: Elem>(src: DType, dst: DType) {
            let (cols, rank) = (3 * BLOCK + 5, 3);
            let mut wf = values(GROUP * cols, 11);
            wf[2 * cols + 7] = f32::INFINITY;
            wf[cols + 1] = f32::NAN;
            let w = enc(src, &wf);
            let left = values(GROUP * rank, 12);
            let right = pack_blocks(&values(rank * cols, 13), rank, cols);
            for (rank, scaling, big) in [(rank, 0.5f32, false), (0, 0.0, false), (rank, 1e38, true)]
            {
                let spec = Rows {
                    src,
                    dst,
                    cols,
                    rank,
                    left: &left[..GROUP * rank],
                    right: &right[..rank * cols],
                    scaling,
                };
                let mut fast = vec![0u8; GROUP * cols * O::SIZE];
                let mut portable = fast.clone();
                let bad = merge_rows(&spec, &w, &mut fast);
                let limit = overflow_limit(dst);
                let portable_bad = merge_columns::<I, O>(&spec, &w, &mut portable, 0, limit);
                assert_eq!(fast, portable, "{src:?} -> {dst:?}, rank {rank}");
                assert_eq!(
                    bad.is_some(),
                    portable_bad,
                    "{src:?} -> {dst:?}, rank {rank}"
                );
                if !big || dst == DType::F16 {
                    assert_eq!(bad.is_some(), big, "{src:?} -> {dst:?}, rank {rank}");
                }
            }
        }
        check::<F32, F32>(DType::F32, DType::F32);
        check::<F32, Bf16>(DType::F32, DType::BF16);
        check::<F32, F16>(DType::F32, DType::F16);
        check::<Bf16, F32>(DType::BF16, DType::F32);
        check::<Bf16, Bf16>(DType::BF16, DType::BF16);
        check::<Bf16, F16>(DType::BF16, DType::F16);
        check::<F16, F32>(DType::F16, DType::F32);
        check::<F16, Bf16>(DType::F16, DType::BF16);
        check::<F16, F16>(DType::F16, DType::F16);
    }

    #[test]
    fn bf16_bits_round_like_torch() {
        let mut specials = vec![
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            1e-40,
            f32::from_bits(0x7f7f_8000),
            f32::from_bits(0x7f7f_7fff),
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
        ];
        specials.extend(values(100_000, 3).iter().map(|v| v * 1e3));
        specials.extend((0..100_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))));
        for v in specials {
            if v.is_nan() {
                assert!(half::bf16::from_bits(bf16_bits(v)).is_nan());
            } else {
                assert_eq!(bf16_bits(v), half::bf16::from_f32(v).to_bits(), "{v:e}");
            }
        }
        assert_eq!(bf16_bits(f32::NAN) & 0x7fc0, 0x7fc0);
    }

    #[test]
    fn bf16_rounds_once_to_nearest_even() {
        let root = tempfile::tempdir().unwrap();
        let model = root.path().join("m");
        fs::create_dir_all(&model).unwrap();
        write_st(
            &model.join("model.safetensors"),
            &[(
                "p.weight",
                "BF16",
                vec![1, 5],
                enc(DType::BF16, &[1.0, 1.0, 1.0, 256.0, -1.0]),
            )],
        );
        let adapter = root.path().join("a");
        fs::create_dir_all(&adapter).unwrap();
        fs::write(
            adapter.join(ADAPTER_CONFIG),
            serde_json::to_vec(&lora_config(1, 1.0)).unwrap(),
        )
        .unwrap();
        let a = [
            2f32.powi(-8),
            3.0 * 2f32.powi(-9),
            2f32.powi(-7),
            1.0,
            -3.0 * 2f32.powi(-9),
        ];
        write_st(
            &adapter.join(ADAPTER_WEIGHTS),
            &[
                (
                    "base_model.model.p.lora_A.weight",
                    "F32",
                    vec![1, 5],
                    enc(DType::F32, &a),
                ),
                (
                    "base_model.model.p.lora_B.weight",
                    "F32",
                    vec![1, 1],
                    enc(DType::F32, &[1.0]),
                ),
            ],
        );
        let out = root.path().join("o");
        merge(
            &model,
            &adapter,
            &out,
            &MergeOptions::default(),
            &Progress::default(),
        )
        .unwrap();
        let (_, _, got) = read_tensor(&out.join("model.safetensors"), "p.weight");
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1). 257 ties to 256.
        assert_eq!(
            dec(DType::BF16, &got),
            [1.0, 1.0078125, 1.0078125, 256.0, -1.0078125]
        );
    }

    #[test]
    fn adapter_errors() {
        let f = fixture();
        let dump_err = |f: &Fixture| match run(f, false) {
            Err(Error::Dump { msg, .. }) => {
                assert_clean(&f.out);
                msg
            }
            other => panic!("expected a Dump error, got {other:?}"),
        };
        let o = "model.layers.0.self_attn.o_proj";
        let write =
            |config: &Value| write_adapter(&f.adapter, config, &[(o, vec![1, 6], vec![6, 1])]);
        let mut config = lora_config(1, 1.0);
        config["use_dora"] = json!(true);
        write(&config);
        assert!(dump_err(&f).contains("DoRA"));
        config["use_dora"] = json!(false);
        config["lora_bias"] = json!(true);
        write(&config);
        assert!(dump_err(&f).contains("lora_bias"));
        config["lora_bias"] = json!(false);
        config["peft_type"] = json!("IA3");
        write(&config);
        assert!(dump_err(&f).contains("only LoRA"));
        config["peft_type"] = json!("LORA");
        config["r"] = json!(8);
        write(&config);
        assert!(dump_err(&f).contains("r = 8"));
        config["r"] = json!(1);
        // Extra tensors in the file.
        let base = lora_config(1, 1.0);
        write(&base);
        let path = f.adapter.join(ADAPTER_WEIGHTS);
        let mut ts: Vec<_> = ["lora_A", "lora_B"]
            .iter()
            .map(|fac| {
                let name = format!("{PEFT_PREFIX}{o}.{fac}.weight");
                let (d, s, b) = read_tensor(&path, &name);
                (name, d, s, dec(d, &b))
            })
            .collect();
        for (extra, want) in [
            (format!("{PEFT_PREFIX}{o}.lora_magnitude_vector"), "DoRA"),
            (format!("{PEFT_PREFIX}{o}.lora_B.bias"), "LoRA bias"),
            (
                format!("{PEFT_PREFIX}score.modules_to_save.weight"),
                "has no tensor score.weight for it to replace",
            ),
        ] {
            let mut with = ts.clone();
            with.push(tensor(&extra, DType::F32, &[6], 9));
            write_tensors(&path, &with);
            let msg = dump_err(&f);
            assert!(msg.contains(want), "{extra}: {msg}");
        }
        // A whole tensor of another shape (a resized vocabulary).
        let mut with = ts.clone();
        with.push(tensor(
            &format!("{PEFT_PREFIX}lm_head.modules_to_save.weight"),
            DType::F32,
            &[6],
            9,
        ));
        write_tensors(&path, &with);
        match run(&f, false) {
            Err(Error::Invalid(m)) => assert!(m.contains("changes the shape"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_clean(&f.out);
        ts[0].3[2] = f32::NAN;
        write_tensors(&path, &ts);
        assert!(dump_err(&f).contains("non-finite"));
        write_tensors(&path, &ts[1..]);
        assert!(dump_err(&f).contains("no lora_A"));
        fs::remove_file(&path).unwrap();
        assert!(matches!(run(&f, false), Err(Error::NotFound { .. })));
        assert_clean(&f.out);
    }

    #[test]
    fn checkpoint_mismatch_errors_leave_nothing() {
        let f = fixture();
        let invalid = |f: &Fixture| match run(f, false) {
            Err(Error::Invalid(msg)) => {
                assert_clean(&f.out);
                msg
            }
            other => panic!("expected an Invalid error, got {other:?}"),
        };
        let cfg = lora_config(1, 1.0);
        write_adapter(
            &f.adapter,
            &cfg,
            &[("model.layers.9.self_attn.o_proj", vec![1, 6], vec![6, 1])],
        );
        let msg = invalid(&f);
        assert!(
            msg.contains("has no tensor model.layers.9.self_attn.o_proj.weight"),
            "{msg}"
        );
        write_adapter(
            &f.adapter,
            &cfg,
            &[("model.layers.0.mlp.down_proj", vec![1, 7], vec![6, 1])],
        );
        let msg = invalid(&f);
        assert!(
            msg.contains("should be [6, 7]") && msg.contains("[7, 40]"),
            "{msg}"
        );
        // A 1-D target.
        write_adapter(&f.adapter, &cfg, &[("model.norm", vec![1, 6], vec![6, 1])]);
        assert!(invalid(&f).contains("is [6]"));
        // float16 overflow while writing the second shard: the first is already written.
        write_adapter(
            &f.adapter,
            &cfg,
            &[("model.layers.1.self_attn.o_proj", vec![1, 6], vec![6, 1])],
        );
        let path = f.adapter.join(ADAPTER_WEIGHTS);
        let a = tensor(
            &format!("{PEFT_PREFIX}model.layers.1.self_attn.o_proj.lora_A.weight"),
            DType::F32,
            &[1, 6],
            1,
        );
        let mut b = tensor(
            &format!("{PEFT_PREFIX}model.layers.1.self_attn.o_proj.lora_B.weight"),
            DType::F32,
            &[6, 1],
            2,
        );
        b.3[3] = 1e9;
        write_tensors(&path, &[a, b]);
        let msg = invalid(&f);
        assert!(msg.contains("overflows float16 in row 3"), "{msg}");
        // An unsupported weight dtype.
        write_adapter(
            &f.adapter,
            &cfg,
            &[("model.layers.0.self_attn.o_proj", vec![1, 6], vec![6, 1])],
        );
        write_st(
            &f.model.join(SHARD1),
            &[
                (
                    "model.embed_tokens.weight",
                    "F32",
                    vec![10, 6],
                    enc(DType::F32, &f.shard1[0].3),
                ),
                (
                    "model.layers.0.self_attn.o_proj.weight",
                    "I8",
                    vec![6, 6],
                    vec![1u8; 36],
                ),
                (
                    "model.layers.0.mlp.down_proj.weight",
                    "BF16",
                    vec![7, 40],
                    enc(DType::BF16, &f.shard1[2].3),
                ),
                (
                    "model.norm.weight",
                    "F32",
                    vec![6],
                    enc(DType::F32, &f.shard1[3].3),
                ),
            ],
        );
        match run(&f, false) {
            Err(Error::Dump { msg, tensor, .. }) => {
                assert!(msg.contains("unsupported dtype int8"), "{msg}");
                assert_eq!(
                    tensor.as_deref(),
                    Some("model.layers.0.self_attn.o_proj.weight")
                );
            }
            other => panic!("{other:?}"),
        }
        assert_clean(&f.out);
    }

    #[test]
    fn output_directory_rules_and_cancel() {
        let f = fixture();
        let go = |out: &Path, overwrite| {
            merge(
                &f.model,
                &f.adapter,
                out,
                &MergeOptions { overwrite },
                &Progress::default(),
            )
        };
        let invalid = |r: Result<MergeSummary>| match r {
            Err(Error::Invalid(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(invalid(go(&f.model, true)).contains("contain each other"));
        assert!(invalid(go(&f.model.join("sub/x"), false)).contains("contain each other"));
        assert!(invalid(go(f.model.parent().unwrap(), true)).contains("contain each other"));
        let other = f.out.with_file_name("notes");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join("a.txt"), b"x").unwrap();
        assert!(invalid(go(&other, true)).contains("not a checkpoint"));
        fs::remove_dir_all(&other).unwrap();
        // A cancelled merge leaves nothing.
        let progress = Progress::default();
        progress.cancel.store(true, Ordering::Relaxed);
        let e = merge(
            &f.model,
            &f.adapter,
            &f.out,
            &MergeOptions::default(),
            &progress,
        )
        .unwrap_err();
        assert!(matches!(e, Error::Cancelled), "{e}");
        assert_clean(&f.out);
        // A checkpoint without safetensors weights.
        let empty = f.model.with_file_name("bin-only");
        fs::create_dir_all(&empty).unwrap();
        fs::write(empty.join("pytorch_model.bin"), b"x").unwrap();
        let e = merge(
            &empty,
            &f.adapter,
            &f.out,
            &MergeOptions::default(),
            &Progress::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("no .safetensors"), "{e}");
        // An index naming a tensor its shard lacks.
        let index = f.model.join(INDEX_FILE);
        let mut doc: Value = serde_json::from_slice(&fs::read(&index).unwrap()).unwrap();
        doc["weight_map"]["ghost.weight"] = json!(SHARD1);
        fs::write(&index, serde_json::to_vec(&doc).unwrap()).unwrap();
        let e = go(&f.out, false).unwrap_err();
        assert!(e.to_string().contains("[ghost.weight]"), "{e}");
        assert_clean(&f.out);
    }

    #[test]
    fn float32_overflow_names_the_row() {
        let root = tempfile::tempdir().unwrap();
        let model = root.path().join("m");
        fs::create_dir_all(&model).unwrap();
        let mut w = values(4 * 16, 5);
        w[2 * 16 + 5] = 3e38;
        write_st(
            &model.join("model.safetensors"),
            &[("p.weight", "F32", vec![4, 16], enc(DType::F32, &w))],
        );
        let adapter = root.path().join("a");
        fs::create_dir_all(&adapter).unwrap();
        let config = serde_json::to_vec(&lora_config(1, 1.0)).unwrap();
        fs::write(adapter.join(ADAPTER_CONFIG), config).unwrap();
        write_st(
            &adapter.join(ADAPTER_WEIGHTS),
            &[
                (
                    "base_model.model.p.lora_A.weight",
                    "F32",
                    vec![1, 16],
                    enc(DType::F32, &[1e19; 16]),
                ),
                (
                    "base_model.model.p.lora_B.weight",
                    "F32",
                    vec![4, 1],
                    enc(DType::F32, &[3e19; 4]),
                ),
            ],
        );
        let out = root.path().join("out").join("o");
        let e = merge(
            &model,
            &adapter,
            &out,
            &MergeOptions::default(),
            &Progress::default(),
        );
        match e {
            Err(Error::Invalid(m)) => assert!(m.contains("overflows float32 in row 2"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_clean(&out);
    }

    #[test]
    fn keys_peft_would_not_load_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let loras = [("model.layers.0.self_attn.o_proj", vec![1, 4], vec![4, 1])];
        let refused = |config: &Value, rename: Option<(&str, &str)>| {
            let dir = root.path().join(format!("a{}", rand_suffix()));
            write_adapter(&dir, config, &loras);
            if let Some((from, to)) = rename {
                let w = dir.join(ADAPTER_WEIGHTS);
                let bytes = fs::read(&w).unwrap();
                let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
                let header = String::from_utf8(bytes[8..8 + header_len].to_vec()).unwrap();
                let header = header.replace(from, to);
                let mut out = (header.len() as u64).to_le_bytes().to_vec();
                out.extend_from_slice(header.as_bytes());
                out.extend_from_slice(&bytes[8 + header_len..]);
                fs::write(&w, out).unwrap();
            }
            match read_adapter(&dir) {
                Err(e) => e.to_string(),
                Ok(_) => "loaded".into(),
            }
        };
        let mut other = lora_config(1, 1.0);
        other["target_modules"] = json!(["q_proj"]);
        assert!(refused(&other, None).ends_with(
            "[base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight]: module \
             model.layers.0.self_attn.o_proj is not in target_modules: PEFT would not load this \
             key; refusing to merge what the served adapter would not apply"
        ));
        let mut pattern = lora_config(1, 1.0);
        pattern["target_modules"] = json!(r".*\.o_proj");
        assert_eq!(refused(&pattern, None), "loaded");
        let doubled = refused(
            &lora_config(1, 1.0),
            Some(("base_model.model.", "base_model.model.base_model.model.")),
        );
        assert!(
            doubled.contains("PEFT would not load this key"),
            "{doubled}"
        );
        let named = refused(
            &lora_config(1, 1.0),
            Some(("lora_A.weight", "lora_A.default.weight")),
        );
        assert!(named.contains("PEFT would not load this key"), "{named}");
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    #[test]
    fn factor_keys() {
        let k = |n: &str| match factor_key(n) {
            FactorKey::Factor { module, kind, is_a } => format!("{module} {kind:?} {is_a}"),
            FactorKey::LoraBias => "bias".into(),
            FactorKey::Magnitude => "magnitude".into(),
            FactorKey::Other => "other".into(),
        };
        assert_eq!(
            k("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"),
            "model.layers.1.mlp.down_proj Linear true"
        );
        assert_eq!(
            k("base_model.model.x.lora_B.default.weight"),
            "x Linear false"
        );
        assert_eq!(
            k("base_model.model.emb.lora_embedding_B"),
            "emb Embedding false"
        );
        assert_eq!(k("x.lora_embedding_A.default"), "x Embedding true");
        assert_eq!(k("base_model.model.x.lora_B.bias"), "bias");
        assert_eq!(k("base_model.model.x.lora_magnitude_vector"), "magnitude");
        assert_eq!(k("base_model.model.x.lora_A.weight.extra"), "other");
        assert_eq!(k("lora_A.weight"), "other");
        assert_eq!(k("base_model.model.lm_head.weight"), "other");
    }
}
