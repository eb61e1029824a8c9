//! The PEFT adapter: `adapter_config.json` (LoRA settings, per-module rank and alpha patterns)
//! and its tensors, read into [`Adapter`] with every key PEFT would not load refused.

use super::*;

struct LoraConfig {
    pub(super) r: usize,
    pub(super) alpha: f64,
    pub(super) rslora: bool,
    pub(super) fan_in_fan_out: bool,
    pub(super) rank_pattern: Vec<(String, usize)>,
    pub(super) alpha_pattern: Vec<(String, f64)>,
    /// `target_modules`: names (a module is targeted when its path is one or ends with
    /// `.name`) or one regular expression the whole path must match; None selects every module
    /// (absent, or `"all-linear"`).
    pub(super) targets: Option<Targets>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::testutil::*;
    use serde_json::json;

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
