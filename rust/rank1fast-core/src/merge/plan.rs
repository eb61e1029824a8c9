//! The checkpoint (its shards and index) and the plan: which tensor of which shard each LoRA
//! and each whole tensor of the adapter lands on, with shapes, dtypes and layouts checked.

use super::*;

pub(super) struct Shard {
    /// Relative to the checkpoint directory.
    pub(super) rel: PathBuf,
    pub(super) path: PathBuf,
    pub(super) file: File,
    pub(super) map: Mmap,
    pub(super) tensors: Vec<TensorInfo>,
}

pub(super) struct Checkpoint {
    pub(super) shards: Vec<Shard>,
    pub(super) model_type: Option<String>,
}

pub(super) fn is_safetensors(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

pub(super) fn open_shard(dir: &Path, rel: PathBuf) -> Result<Shard> {
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
pub(super) fn open_checkpoint(dir: &Path) -> Result<Checkpoint> {
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
pub(super) struct Target {
    pub(super) shard: usize,
    /// The checkpoint tensor written (its place, dtype and shape in the output).
    pub(super) tensor: TensorInfo,
    pub(super) dtype: DType,
    /// Where `W` is read: `None` for the checkpoint, else (offset in the adapter file, dtype).
    pub(super) from_adapter: Option<(usize, DType)>,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) rank: usize,
    /// `[rows, rank]`.
    pub(super) left: Vec<f32>,
    /// `[rank, cols]`, as [`pack_blocks`] lays it out.
    pub(super) right: Vec<f32>,
    pub(super) scaling: f32,
    pub(super) module: String,
    pub(super) scaling_f64: f64,
}

pub(super) fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
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
pub(super) fn find_tensor<'a>(
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

pub(super) fn tensor_info<'a>(ckpt: &'a Checkpoint, shard: usize, name: &str) -> &'a TensorInfo {
    ckpt.shards[shard]
        .tensors
        .iter()
        .find(|t| t.name == name)
        .expect("indexed tensor")
}

pub(super) fn float_dtype(ckpt: &Checkpoint, shard: usize, t: &TensorInfo) -> Result<DType> {
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
pub(super) fn plan(
    adapter: &mut Adapter,
    ckpt: &Checkpoint,
    model_dir: &Path,
) -> Result<Vec<Target>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::testutil::*;
    use serde_json::json;

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
}
