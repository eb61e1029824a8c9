//! The tensors of rank-1 LoRA adapters and their safetensors file.
//!
//! A LoRA on a linear module adds `B A x` to its output. For a steering vector `v` (in the
//! module's output space) and a constant direction `b` (in its input space, `b·x ≈ 1`), the
//! adapter is `A = bᵀ` (`[r, d_in]`, row 0) and `B = scale·v` (`[d_out, r]`, column 0); extra
//! ranks are zero. Only the product `B A` matters, so the two factors are rescaled to equal
//! norms first: `b` is often tiny (1/|mean| of an outlier dimension, 1e-3 and below) and `v`
//! large, and float16 would flush small entries of `b` to subnormals or zero.
//!
//! The file is written under a temporary name in the target directory, synced, and renamed,
//! so a crash never leaves a partial adapter behind.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Map, Value};

use crate::dtype::{encode_f32, DType};
use crate::error::{Error, Result};

/// Largest rank we write (serving stacks top out at a few hundred).
pub const MAX_RANK: usize = 1024;

/// One adapted module: its path in the model, the direction read by `lora_A` and the steering
/// vector written by `lora_B`.
#[derive(Clone, Debug)]
pub struct LoraSite {
    /// Module path as in `model.named_modules()`, e.g. `model.layers.5.self_attn.o_proj`.
    pub module: String,
    /// `b`, length `d_in` (the module's input size).
    pub direction: Vec<f64>,
    /// `v`, length `d_out` (the module's output size), before `scale`.
    pub vector: Vec<f64>,
    /// Further rank-1 terms `(a_k, u_k)` (lengths `d_in`, `d_out`), written as they are (no
    /// `scale`) at ranks `1, 2, ...`: the adapter then adds `scale·v (b·x) + Σ_k u_k (a_k·x)`.
    /// rank1fast's downstream corrections use them (`rank1fast.corrections`).
    pub extra: Vec<(Vec<f64>, Vec<f64>)>,
}

/// The two factors of one module's LoRA, row-major f32, product `B A = scale·v bᵀ`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    /// `[rank, d_in]`: row 0 is `c·bᵀ`, other rows zero.
    pub a: Vec<f32>,
    /// `[d_out, rank]`: column 0 is `scale·v / c`, other columns zero.
    pub b: Vec<f32>,
    pub d_in: usize,
    pub d_out: usize,
    pub rank: usize,
    /// The balancing factor `c = sqrt(‖scale·v‖ / ‖b‖)` (1 when the vector is zero).
    pub balance: f64,
}

/// What [`write_lora`] wrote.
#[derive(Clone, Debug)]
pub struct WriteSummary {
    pub path: PathBuf,
    pub bytes: u64,
    /// Tensor names in file order.
    pub tensors: Vec<String>,
}

fn norm(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

/// Build `A` and `B` for one module, with balanced norms and zero-padded extra ranks.
///
/// Errors when a vector is empty or holds a non-finite value, the direction is zero, or the
/// rank is outside `1..=MAX_RANK`; `what` names the module in messages.
pub fn lora_pair(
    what: &str,
    direction: &[f64],
    vector: &[f64],
    scale: f64,
    rank: usize,
) -> Result<LoraPair> {
    lora_terms(what, direction, vector, scale, &[], rank)
}

/// [`lora_pair`] with further rank-1 terms `(a_k, u_k)` at ranks `1..=extra.len()`, each
/// balanced on its own (`u_k` is written without `scale`). Errors as [`lora_pair`], and when
/// `1 + extra.len()` exceeds `rank` or a term's sizes differ from `direction`'s and `vector`'s
/// (a zero `a_k` is allowed: that term is zero).
pub fn lora_terms(
    what: &str,
    direction: &[f64],
    vector: &[f64],
    scale: f64,
    extra: &[(Vec<f64>, Vec<f64>)],
    rank: usize,
) -> Result<LoraPair> {
    if rank == 0 || rank > MAX_RANK {
        return Err(Error::Invalid(format!(
            "rank must be between 1 and {MAX_RANK}, got {rank}"
        )));
    }
    if 1 + extra.len() > rank {
        return Err(Error::Invalid(format!(
            "{what}: {} rank-1 terms do not fit in rank {rank}",
            1 + extra.len()
        )));
    }
    if !scale.is_finite() {
        return Err(Error::Invalid(format!("scale must be finite, got {scale}")));
    }
    let check = |name: &str, x: &[f64]| -> Result<()> {
        if x.is_empty() {
            return Err(Error::Invalid(format!("{what}: the {name} is empty")));
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!(
                "{what}: the {name} holds a non-finite value ({}) at index {i}",
                x[i]
            )));
        }
        Ok(())
    };
    check("direction", direction)?;
    check("steering vector", vector)?;
    let nb = norm(direction);
    if nb == 0.0 {
        return Err(Error::Invalid(format!("{what}: the direction is zero")));
    }
    let nv = norm(vector) * scale.abs();
    let balance = if nv > 0.0 { (nv / nb).sqrt() } else { 1.0 };
    let (d_in, d_out) = (direction.len(), vector.len());
    let mut a = vec![0f32; rank * d_in];
    for (dst, &x) in a[..d_in].iter_mut().zip(direction) {
        *dst = (x * balance) as f32;
    }
    let mut b = vec![0f32; d_out * rank];
    let col = scale / balance;
    for (i, &x) in vector.iter().enumerate() {
        b[i * rank] = (x * col) as f32;
    }
    for (k, (ak, uk)) in extra.iter().enumerate() {
        let k = k + 1;
        check(&format!("direction of term {k}"), ak)?;
        check(&format!("vector of term {k}"), uk)?;
        if ak.len() != d_in || uk.len() != d_out {
            return Err(Error::Invalid(format!(
                "{what}: term {k} has sizes {} x {}, the module {d_in} x {d_out}",
                ak.len(),
                uk.len()
            )));
        }
        let (na, nu) = (norm(ak), norm(uk));
        let c = if na > 0.0 && nu > 0.0 {
            (nu / na).sqrt()
        } else {
            1.0
        };
        for (dst, &x) in a[k * d_in..(k + 1) * d_in].iter_mut().zip(ak) {
            *dst = (x * c) as f32;
        }
        for (i, &x) in uk.iter().enumerate() {
            b[i * rank + k] = (x / c) as f32;
        }
    }
    Ok(LoraPair {
        a,
        b,
        d_in,
        d_out,
        rank,
        balance,
    })
}

/// One tensor to write: its name, shape and the f32 values to encode.
pub struct TensorSpec<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: &'a [f32],
}

/// Write `tensors` as a safetensors file at `path`, atomically (temporary name in the same
/// directory, fsync, rename). `metadata` goes to the header's `__metadata__`.
pub fn write_safetensors(
    path: &Path,
    tensors: &[TensorSpec<'_>],
    dtype: DType,
    metadata: &BTreeMap<String, String>,
) -> Result<u64> {
    let mut header = Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut data = Vec::new();
    let mut seen = HashSet::new();
    for t in tensors {
        if !seen.insert(t.name.as_str()) || t.name == "__metadata__" {
            return Err(Error::Invalid(format!(
                "{}: duplicate or reserved tensor name {:?}",
                path.display(),
                t.name
            )));
        }
        let n: usize = t.shape.iter().product();
        if n != t.values.len() {
            return Err(Error::Invalid(format!(
                "{}: tensor {} has shape {:?} ({n} values) but {} values were given",
                path.display(),
                t.name,
                t.shape,
                t.values.len()
            )));
        }
        let begin = data.len();
        encode_f32(dtype, t.values, &mut data);
        if dtype != DType::F32 {
            // A value beyond the target type's range encodes as an infinity.
            let mut back = vec![0f32; n];
            crate::dtype::decode_f32(dtype, &data[begin..], &mut back);
            if let Some(i) = back.iter().position(|v| !v.is_finite()) {
                return Err(Error::Invalid(format!(
                    "{}: tensor {} value {} at index {i} overflows {}",
                    path.display(),
                    t.name,
                    t.values[i],
                    dtype.name()
                )));
            }
        }
        header.insert(
            t.name.clone(),
            json!({
                "dtype": dtype.safetensors_tag(),
                "shape": t.shape,
                "data_offsets": [begin, data.len()],
            }),
        );
    }
    let mut head = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| Error::Invalid(format!("{}: header: {e}", path.display())))?;
    // The data section starts 8-byte aligned, as the safetensors writer does it.
    head.resize(head.len().next_multiple_of(8), b' ');
    let mut bytes = Vec::with_capacity(8 + head.len() + data.len());
    bytes.extend_from_slice(&(head.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&head);
    bytes.extend_from_slice(&data);
    write_atomic(path, &bytes)?;
    Ok(bytes.len() as u64)
}

/// Write `bytes` to `path` through a temporary file in the same directory: create, write,
/// fsync, rename over `path`, then fsync the directory (best effort).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
    if !dir.is_dir() {
        return Err(Error::NotFound { path: dir });
    }
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The safetensors key prefix PEFT uses for a module (`PeftModel.save_pretrained` drops the
/// adapter name, so the keys are the same for every adapter name).
pub fn peft_key(module: &str, factor: &str) -> String {
    format!("base_model.model.{module}.{factor}.weight")
}

fn check_module(module: &str) -> Result<()> {
    let ok = !module.is_empty()
        && module
            .split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "module path {module:?} is not a dotted path of identifiers (e.g. model.layers.5.mlp.down_proj)"
        )))
    }
}

/// Write the `adapter_model.safetensors` of a PEFT LoRA adapter holding one rank-`rank` LoRA
/// per site: `base_model.model.<module>.lora_A.weight` `[rank, d_in]` and
/// `...lora_B.weight` `[d_out, rank]`, encoded as `dtype`.
///
/// Every site is validated before anything is written; the file appears complete or not at
/// all.
pub fn write_lora(
    path: &Path,
    sites: &[LoraSite],
    scale: f64,
    rank: usize,
    dtype: DType,
    metadata: &BTreeMap<String, String>,
) -> Result<WriteSummary> {
    if sites.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: an adapter needs at least one site",
            path.display()
        )));
    }
    let mut modules = HashSet::new();
    let mut pairs = Vec::with_capacity(sites.len());
    for s in sites {
        check_module(&s.module)?;
        if !modules.insert(s.module.as_str()) {
            return Err(Error::Invalid(format!(
                "module {} appears twice in one adapter",
                s.module
            )));
        }
        pairs.push(lora_terms(
            &format!("module {}", s.module),
            &s.direction,
            &s.vector,
            scale,
            &s.extra,
            rank,
        )?);
    }
    let mut specs = Vec::with_capacity(2 * sites.len());
    for (s, p) in sites.iter().zip(&pairs) {
        specs.push(TensorSpec {
            name: peft_key(&s.module, "lora_A"),
            shape: vec![p.rank, p.d_in],
            values: &p.a,
        });
        specs.push(TensorSpec {
            name: peft_key(&s.module, "lora_B"),
            shape: vec![p.d_out, p.rank],
            values: &p.b,
        });
    }
    let bytes = write_safetensors(path, &specs, dtype, metadata)?;
    Ok(WriteSummary {
        path: path.to_path_buf(),
        bytes,
        tensors: specs.into_iter().map(|t| t.name).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::decode_f32;
    use crate::source::{read_safetensors, StoredType};

    fn product(p: &LoraPair) -> Vec<f64> {
        // (B A)[i, j] = Σ_k B[i, k] A[k, j]
        let mut out = vec![0f64; p.d_out * p.d_in];
        for i in 0..p.d_out {
            for k in 0..p.rank {
                let bik = p.b[i * p.rank + k] as f64;
                for j in 0..p.d_in {
                    out[i * p.d_in + j] += bik * p.a[k * p.d_in + j] as f64;
                }
            }
        }
        out
    }

    fn site(module: &str, d_in: usize, d_out: usize) -> LoraSite {
        LoraSite {
            module: module.into(),
            direction: (0..d_in).map(|i| 1e-4 * (i as f64 + 1.0)).collect(),
            vector: (0..d_out).map(|i| 3.0 * (i as f64) - 5.0).collect(),
            extra: vec![],
        }
    }

    #[test]
    fn extra_terms_add_up_and_are_checked() {
        let s = site("m", 5, 3);
        let a1: Vec<f64> = (0..5).map(|j| 0.5 - j as f64).collect();
        let u1: Vec<f64> = (0..3).map(|i| 1e-3 * (i as f64 + 2.0)).collect();
        let extra = vec![(a1.clone(), u1.clone()), (vec![0.0; 5], vec![0.0; 3])];
        let p = lora_terms("m", &s.direction, &s.vector, -2.0, &extra, 4).unwrap();
        let prod = product(&p);
        for i in 0..3 {
            for j in 0..5 {
                let want = -2.0 * s.vector[i] * s.direction[j] + u1[i] * a1[j];
                assert!((prod[i * 5 + j] - want).abs() <= 1e-5 * want.abs().max(1e-3));
            }
        }
        assert!(p.a[3 * 5..].iter().all(|&x| x == 0.0)); // rank 3 is padding
        let e = |r: Result<LoraPair>| r.unwrap_err().to_string();
        assert!(e(lora_terms("m", &s.direction, &s.vector, 1.0, &extra, 2)).contains("do not fit"));
        let bad = vec![(vec![1.0; 4], vec![1.0; 3])];
        assert!(e(lora_terms("m", &s.direction, &s.vector, 1.0, &bad, 2)).contains("sizes 4 x 3"));
        let nan = vec![(vec![f64::NAN; 5], vec![1.0; 3])];
        assert!(e(lora_terms("m", &s.direction, &s.vector, 1.0, &nan, 2)).contains("term 1"));
    }

    #[test]
    fn pair_is_balanced_and_multiplies_to_scaled_outer_product() {
        let s = site("m", 6, 4);
        for rank in [1, 3, 8] {
            let p = lora_pair("m", &s.direction, &s.vector, 2.5, rank).unwrap();
            let na = p.a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let nb = p.b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            assert!((na / nb - 1.0).abs() < 1e-6, "rank {rank}: {na} vs {nb}");
            let prod = product(&p);
            for i in 0..4 {
                for j in 0..6 {
                    let want = 2.5 * s.vector[i] * s.direction[j];
                    assert!((prod[i * 6 + j] - want).abs() <= 1e-6 * want.abs().max(1e-6));
                }
            }
            // Extra ranks are exactly zero.
            assert!(p.a[6..].iter().all(|&x| x == 0.0));
            assert!((0..4).all(|i| (1..rank).all(|k| p.b[i * rank + k] == 0.0)));
        }
    }

    #[test]
    fn negative_scale_and_zero_vector() {
        let s = site("m", 3, 2);
        let p = lora_pair("m", &s.direction, &s.vector, -1.0, 1).unwrap();
        assert_eq!(p.b[0], (-s.vector[0] / p.balance) as f32);
        let z = lora_pair("m", &s.direction, &[0.0, 0.0], 1.0, 1).unwrap();
        assert_eq!(z.balance, 1.0);
        assert!(z.b.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn pair_rejects_bad_input() {
        let e = |r: Result<LoraPair>| r.unwrap_err().to_string();
        assert!(e(lora_pair("m", &[1.0], &[1.0], 1.0, 0)).contains("rank"));
        assert!(e(lora_pair("m", &[], &[1.0], 1.0, 1)).contains("direction is empty"));
        assert!(e(lora_pair("m", &[0.0, 0.0], &[1.0], 1.0, 1)).contains("direction is zero"));
        assert!(e(lora_pair("m", &[1.0], &[f64::NAN], 1.0, 1)).contains("non-finite"));
        assert!(e(lora_pair("m", &[1.0], &[1.0], f64::INFINITY, 1)).contains("scale"));
    }

    fn read_back(path: &Path) -> BTreeMap<String, (Vec<usize>, StoredType, Vec<f32>)> {
        read_safetensors(path)
            .unwrap()
            .into_iter()
            .map(|t| {
                let StoredType::Float(dt) = t.stored else {
                    panic!("not a float tensor")
                };
                let mut v = vec![0f32; t.nbytes / dt.size()];
                decode_f32(dt, t.bytes(), &mut v);
                (t.name.clone(), (t.shape.clone(), t.stored, v))
            })
            .collect()
    }

    #[test]
    fn writes_peft_keys_shapes_and_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let sites = [
            site("model.layers.5.self_attn.o_proj", 8, 8),
            site("model.layers.15.mlp.down_proj", 12, 8),
        ];
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let path = dir.path().join(format!("{}.safetensors", dtype.name()));
            let summary = write_lora(&path, &sites, 2.0, 4, dtype, &meta).unwrap();
            assert_eq!(summary.bytes, fs::metadata(&path).unwrap().len());
            let back = read_back(&path);
            assert_eq!(back.len(), 4);
            for s in &sites {
                let (ashape, astored, a) = &back[&peft_key(&s.module, "lora_A")];
                let (bshape, _, b) = &back[&peft_key(&s.module, "lora_B")];
                assert_eq!(*astored, StoredType::Float(dtype));
                assert_eq!(ashape, &vec![4, s.direction.len()]);
                assert_eq!(bshape, &vec![s.vector.len(), 4]);
                let p = LoraPair {
                    a: a.clone(),
                    b: b.clone(),
                    d_in: s.direction.len(),
                    d_out: s.vector.len(),
                    rank: 4,
                    balance: 1.0,
                };
                let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
                let prod = product(&p);
                let scale = norm(&s.vector) * norm(&s.direction) * 2.0;
                for i in 0..p.d_out {
                    for j in 0..p.d_in {
                        let want = 2.0 * s.vector[i] * s.direction[j];
                        assert!(
                            (prod[i * p.d_in + j] - want).abs() <= tol * scale,
                            "{dtype:?} [{i},{j}]: {} vs {want}",
                            prod[i * p.d_in + j]
                        );
                    }
                }
            }
            // The header is 8-byte aligned and carries the metadata.
            let raw = fs::read(&path).unwrap();
            let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
            assert_eq!(n % 8, 0);
            let head: Value = serde_json::from_slice(&raw[8..8 + n]).unwrap();
            assert_eq!(head["__metadata__"]["format"], "pt");
        }
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    }

    #[test]
    fn balancing_keeps_tiny_directions_alive_in_f16() {
        // |b| ~ 1e-7 per entry would be flushed to zero by f16 without balancing.
        let s = LoraSite {
            module: "m".into(),
            direction: vec![1e-7, -2e-7, 3e-7],
            vector: vec![40.0, -20.0],
            extra: vec![],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        write_lora(
            &path,
            std::slice::from_ref(&s),
            1.0,
            1,
            DType::F16,
            &BTreeMap::new(),
        )
        .unwrap();
        let back = read_back(&path);
        let a = &back["base_model.model.m.lora_A.weight"].2;
        let b = &back["base_model.model.m.lora_B.weight"].2;
        for (i, v) in s.vector.iter().enumerate() {
            for (j, d) in s.direction.iter().enumerate() {
                let got = b[i] as f64 * a[j] as f64;
                let want = v * d;
                assert!((got - want).abs() < 2e-3 * want.abs(), "{got} vs {want}");
            }
        }
    }

    #[test]
    fn write_rejects_bad_input_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        let none = BTreeMap::new();
        let err = |sites: &[LoraSite], dtype| {
            write_lora(&path, sites, 1.0, 1, dtype, &none)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[], DType::F32).contains("at least one site"));
        let dup = [site("a.b", 2, 2), site("a.b", 2, 2)];
        assert!(err(&dup, DType::F32).contains("twice"));
        assert!(err(&[site("a..b", 2, 2)], DType::F32).contains("module path"));
        assert!(err(&[site("a b", 2, 2)], DType::F32).contains("module path"));
        let mut bad = site("ok.x", 2, 2);
        bad.vector[1] = f64::INFINITY;
        let msg = err(&[site("ok.y", 2, 2), bad], DType::F32);
        assert!(
            msg.contains("module ok.x") && msg.contains("non-finite"),
            "{msg}"
        );
        let huge = LoraSite {
            module: "h".into(),
            direction: vec![1.0],
            vector: vec![1e12],
            extra: vec![],
        };
        assert!(err(&[huge], DType::F16).contains("overflows float16"));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        // A missing directory is a NotFound error.
        let missing = dir.path().join("nope").join("a.safetensors");
        let e = write_lora(&missing, &[site("m", 2, 2)], 1.0, 1, DType::F32, &none).unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{e}");
    }

    #[test]
    fn rewrite_replaces_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        let none = BTreeMap::new();
        write_lora(&path, &[site("m", 4, 4)], 1.0, 8, DType::F32, &none).unwrap();
        let big = fs::metadata(&path).unwrap().len();
        write_lora(&path, &[site("m", 4, 4)], 1.0, 1, DType::F32, &none).unwrap();
        let small = fs::metadata(&path).unwrap().len();
        assert!(small < big);
        assert_eq!(
            read_back(&path)["base_model.model.m.lora_A.weight"].0,
            vec![1, 4]
        );
    }
}
