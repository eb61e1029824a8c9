//! Fixtures shared by the merge tests: safetensors files, adapters, a small checkpoint, and
//! the f64 reference of a merged tensor.

use super::*;
use crate::dtype::encode_f32;
use serde_json::json;

pub(crate) type Spec<'a> = (&'a str, &'a str, Vec<usize>, Vec<u8>);

/// A safetensors file holding `tensors` (name, dtype tag, shape, raw bytes) in this order.
pub(crate) fn write_st(path: &Path, tensors: &[Spec<'_>]) {
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

pub(crate) fn enc(dtype: DType, v: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_f32(dtype, v, &mut out);
    out
}

pub(crate) fn dec(dtype: DType, b: &[u8]) -> Vec<f32> {
    let mut v = vec![0f32; b.len() / dtype.size()];
    decode_f32(dtype, b, &mut v);
    v
}

/// Deterministic values in [-1, 1).
pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
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

pub(crate) fn tensor(
    name: &str,
    dtype: DType,
    shape: &[usize],
    seed: u64,
) -> (String, DType, Vec<usize>, Vec<f32>) {
    // Values the dtype represents exactly, so that they are what the merge reads.
    let v = dec(dtype, &enc(dtype, &values(shape.iter().product(), seed)));
    (name.into(), dtype, shape.to_vec(), v)
}

pub(crate) fn write_tensors(path: &Path, ts: &[(String, DType, Vec<usize>, Vec<f32>)]) {
    let specs: Vec<Spec<'_>> = ts
        .iter()
        .map(|(n, d, s, v)| (n.as_str(), d.safetensors_tag(), s.clone(), enc(*d, v)))
        .collect();
    write_st(path, &specs);
}

pub(crate) fn lora_config(r: usize, alpha: f64) -> Value {
    json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "bias": "none", "fan_in_fan_out": false, "use_rslora": false, "use_dora": false,
        "rank_pattern": {}, "alpha_pattern": {},
    })
}

/// An adapter directory: config + `(module, A [r, d_in], B [d_out, r])` as f32.
/// `target_modules` is the modules written unless `config` names them.
pub(crate) fn write_adapter(dir: &Path, config: &Value, loras: &[(&str, Vec<usize>, Vec<usize>)]) {
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

pub(crate) fn read_tensor(path: &Path, name: &str) -> (DType, Vec<usize>, Vec<u8>) {
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
pub(crate) fn expected(
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

pub(crate) struct Fixture {
    pub(crate) _root: tempfile::TempDir,
    pub(crate) model: PathBuf,
    pub(crate) adapter: PathBuf,
    pub(crate) out: PathBuf,
    pub(crate) shard1: Vec<(String, DType, Vec<usize>, Vec<f32>)>,
    pub(crate) shard2: Vec<(String, DType, Vec<usize>, Vec<f32>)>,
}

pub(crate) const SHARD1: &str = "model-00001-of-00002.safetensors";
pub(crate) const SHARD2: &str = "model-00002-of-00002.safetensors";

/// A two-shard checkpoint (f32, bf16 and f16 weights, an int64 buffer, an index, config,
/// tokenizer, a nested file and a .git directory) and an r = 2, alpha = 4 adapter on three
/// of its weights and the large lm_head (two chunks).
pub(crate) fn fixture() -> Fixture {
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

pub(crate) fn run(f: &Fixture, overwrite: bool) -> Result<MergeSummary> {
    merge(
        &f.model,
        &f.adapter,
        &f.out,
        &MergeOptions { overwrite },
        &Progress::default(),
    )
}

/// Nothing at `out`, and no temporary entry next to it.
pub(crate) fn assert_clean(out: &Path) {
    assert!(!out.exists(), "{} exists", out.display());
    if let Ok(entries) = fs::read_dir(out.parent().unwrap()) {
        let names: Vec<_> = entries.map(|e| e.unwrap().file_name()).collect();
        assert!(names.is_empty(), "left behind: {names:?}");
    }
}

pub(crate) fn adapter_factor(f: &Fixture, module: &str, factor: &str) -> Vec<f32> {
    let (d, _, b) = read_tensor(
        &f.adapter.join(ADAPTER_WEIGHTS),
        &format!("{PEFT_PREFIX}{module}.{factor}.weight"),
    );
    dec(d, &b)
}

pub(crate) fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
