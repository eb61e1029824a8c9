//! Finding the sites in a path and mapping their bytes: dump directories (manifest + safetensors
//! shards), bare `.safetensors` and `.npy` files, and directories of those.
//!
//! Every header is untrusted input: lengths are checked against the file before anything is
//! allocated or read, and every problem is an [`Error::Dump`] naming the file and tensor.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::Value;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Largest safetensors or .npy header we accept (safetensors itself caps at 100 MB).
const MAX_HEADER: u64 = 100 << 20;
/// Tensor names in a dump shard that are per-token metadata, not sites.
pub const POSITION_TENSOR: &str = "position";
pub const DOCUMENT_TENSOR: &str = "document";

/// A read-only memory map of one file.
#[derive(Debug)]
pub struct MappedFile {
    pub path: PathBuf,
    pub map: Mmap,
}

impl MappedFile {
    pub fn open(path: &Path) -> Result<Arc<Self>> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return Err(Error::dump(path, None, "is a directory, expected a file"));
        }
        // SAFETY: the map is read-only; a file truncated under us by another process can still
        // fault, as with every mmap reader (numpy.memmap, safetensors). Dump shards are written
        // under a temporary name and renamed, so complete shards never change.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(Arc::new(MappedFile {
            path: path.to_path_buf(),
            map,
        }))
    }
}

/// Element type of a tensor as stored, including the integer types of metadata tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredType {
    Float(DType),
    I32,
    I64,
    /// Anything else, kept by name so the error can say what it is.
    Other(&'static str),
}

impl StoredType {
    fn size(self) -> Option<usize> {
        match self {
            StoredType::Float(d) => Some(d.size()),
            StoredType::I32 => Some(4),
            StoredType::I64 => Some(8),
            StoredType::Other(_) => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            StoredType::Float(d) => d.name(),
            StoredType::I32 => "int32",
            StoredType::I64 => "int64",
            StoredType::Other(n) => n,
        }
    }
}

/// One tensor inside a mapped file.
#[derive(Clone, Debug)]
pub struct RawTensor {
    pub file: Arc<MappedFile>,
    pub name: String,
    pub stored: StoredType,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the first element in the file.
    pub offset: usize,
    pub nbytes: usize,
}

impl RawTensor {
    pub fn bytes(&self) -> &[u8] {
        &self.file.map[self.offset..self.offset + self.nbytes]
    }

    /// Element `i` of an integer tensor.
    pub fn int_at(&self, i: usize) -> i64 {
        let b = self.bytes();
        match self.stored {
            StoredType::I32 => {
                i32::from_le_bytes(b[4 * i..4 * i + 4].try_into().expect("4 bytes")) as i64
            }
            StoredType::I64 => i64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes")),
            _ => unreachable!("int_at on a float tensor"),
        }
    }
}

/// The rows of one site held by one tensor, with their positions and documents where known.
#[derive(Clone, Debug)]
pub struct SiteSource {
    pub tensor: RawTensor,
    pub dtype: DType,
    /// Number of token rows (batch * seq for 3-D tensors).
    pub rows: usize,
    pub dim: usize,
    /// `Some(seq)` for `[batch, seq, d]` tensors: the position of row r is r % seq and its
    /// document r / seq.
    pub seq: Option<usize>,
    pub positions: Option<RawTensor>,
    pub documents: Option<RawTensor>,
}

impl SiteSource {
    pub fn path(&self) -> &Path {
        &self.tensor.file.path
    }
    pub fn row_bytes(&self) -> usize {
        self.dim * self.dtype.size()
    }
    pub fn position(&self, row: usize) -> Option<i64> {
        match (&self.positions, self.seq) {
            (Some(p), _) => Some(p.int_at(row)),
            (None, Some(seq)) => Some((row % seq) as i64),
            (None, None) => None,
        }
    }
    pub fn document(&self, row: usize) -> Option<i64> {
        match (&self.documents, self.seq) {
            (Some(d), _) => Some(d.int_at(row)),
            (None, Some(seq)) => Some((row / seq) as i64),
            (None, None) => None,
        }
    }
}

/// All sites found under a path, in the order they were first seen.
#[derive(Debug, Default)]
pub struct Sources {
    pub sites: Vec<(String, Vec<SiteSource>)>,
    /// The dump manifest when the path is a dump directory.
    pub manifest: Option<Value>,
}

impl Sources {
    fn push(&mut self, name: String, src: SiteSource) -> Result<()> {
        if let Some((_, list)) = self.sites.iter_mut().find(|(n, _)| *n == name) {
            let first = &list[0];
            if first.dim != src.dim {
                return Err(Error::dump(
                    src.path(),
                    Some(&name),
                    format!(
                        "site has dim {} here but dim {} in {}",
                        src.dim,
                        first.dim,
                        first.path().display()
                    ),
                ));
            }
            list.push(src);
        } else {
            self.sites.push((name, vec![src]));
        }
        Ok(())
    }
}

/// Find every site under `path`: a dump directory, a `.safetensors` or `.npy` file, or a
/// directory of such files.
pub fn open(path: &Path) -> Result<Sources> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mut sources = Sources::default();
    if meta.is_dir() {
        let manifest = path.join("manifest.json");
        if manifest.exists() {
            return open_dump(path, &manifest);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(extension(p).as_deref(), Some("safetensors" | "npy")))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::dump(
                path,
                None,
                "directory holds no manifest.json, .safetensors or .npy file",
            ));
        }
        for f in files {
            open_file(&f, &mut sources)?;
        }
    } else {
        open_file(path, &mut sources)?;
    }
    if sources.sites.is_empty() {
        return Err(Error::dump(
            path,
            None,
            "no 2-D [tokens, dim] or 3-D [batch, seq, dim] float tensor found",
        ));
    }
    Ok(sources)
}

fn extension(p: &Path) -> Option<String> {
    p.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
}

fn open_file(path: &Path, sources: &mut Sources) -> Result<()> {
    match extension(path).as_deref() {
        Some("safetensors") => {
            let tensors = read_safetensors(path)?;
            add_safetensors_sites(path, tensors, sources, None)
        }
        Some("npy") => {
            let t = read_npy(path)?;
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let src = site_source(path, &name, t, None, None)?;
            sources.push(name, src)
        }
        _ => Err(Error::dump(
            path,
            None,
            "unknown file type: expected .safetensors, .npy or a dump directory",
        )),
    }
}

/// Turn the tensors of one safetensors file into site sources. `only` restricts the sites to
/// those names (a dump manifest's sites); other tensors then are ignored.
fn add_safetensors_sites(
    path: &Path,
    tensors: Vec<RawTensor>,
    sources: &mut Sources,
    only: Option<&BTreeMap<String, usize>>,
) -> Result<()> {
    let find = |n: &str| tensors.iter().find(|t| t.name == n).cloned();
    let positions = find(POSITION_TENSOR);
    let documents = find(DOCUMENT_TENSOR);
    for meta in [&positions, &documents].into_iter().flatten() {
        if !matches!(meta.stored, StoredType::I32 | StoredType::I64) || meta.shape.len() != 1 {
            return Err(Error::dump(
                path,
                Some(&meta.name),
                format!(
                    "expected a 1-D int32 or int64 tensor, found {} {:?}",
                    meta.stored.name(),
                    meta.shape
                ),
            ));
        }
    }
    for t in &tensors {
        if t.name == POSITION_TENSOR || t.name == DOCUMENT_TENSOR {
            continue;
        }
        match only {
            Some(sites) if !sites.contains_key(&t.name) => continue,
            None if !(t.shape.len() == 2 || t.shape.len() == 3) => continue,
            _ => {}
        }
        let src = site_source(
            path,
            &t.name,
            t.clone(),
            positions.clone(),
            documents.clone(),
        )?;
        if let Some(&dim) = only.and_then(|s| s.get(&t.name)) {
            if dim != src.dim {
                return Err(Error::dump(
                    path,
                    Some(&t.name),
                    format!("manifest says dim {dim} but the tensor has dim {}", src.dim),
                ));
            }
        }
        sources.push(t.name.clone(), src)?;
    }
    Ok(())
}

fn site_source(
    path: &Path,
    name: &str,
    t: RawTensor,
    positions: Option<RawTensor>,
    documents: Option<RawTensor>,
) -> Result<SiteSource> {
    let dtype = match t.stored {
        StoredType::Float(d) => d,
        other => {
            return Err(Error::dump(
                path,
                Some(name),
                format!(
                    "unsupported dtype {}: sites must be float32, float16 or bfloat16",
                    other.name()
                ),
            ))
        }
    };
    let (rows, dim, seq) = match t.shape[..] {
        [n, d] => (n, d, None),
        [b, s, d] => (b * s, d, Some(s)),
        _ => {
            return Err(Error::dump(
                path,
                Some(name),
                format!(
                "expected a 2-D [tokens, dim] or 3-D [batch, seq, dim] tensor, found shape {:?}",
                t.shape
            ),
            ))
        }
    };
    if dim == 0 {
        return Err(Error::dump(path, Some(name), "dim is 0"));
    }
    // Positions and documents only apply to the 2-D tensors they describe, row for row.
    let fits = |m: &Option<RawTensor>| match m {
        Some(m) if seq.is_none() => {
            if m.shape[0] == rows {
                Ok(Some(m.clone()))
            } else {
                Err(Error::dump(
                    path,
                    Some(&m.name),
                    format!("has {} entries but site {name} has {rows} rows", m.shape[0]),
                ))
            }
        }
        _ => Ok(None),
    };
    Ok(SiteSource {
        positions: fits(&positions)?,
        documents: fits(&documents)?,
        tensor: t,
        dtype,
        rows,
        dim,
        seq,
    })
}

/// A tensor described by a header, before it is tied to its mapped file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub stored: StoredType,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the first element in the file.
    pub offset: usize,
    pub nbytes: usize,
}

impl TensorInfo {
    fn into_raw(self, file: &Arc<MappedFile>) -> RawTensor {
        RawTensor {
            file: file.clone(),
            name: self.name,
            stored: self.stored,
            shape: self.shape,
            offset: self.offset,
            nbytes: self.nbytes,
        }
    }
}

/// Read a safetensors file's header and return every tensor, validated against the file size.
pub fn read_safetensors(path: &Path) -> Result<Vec<RawTensor>> {
    let file = MappedFile::open(path)?;
    let infos = parse_safetensors(&file.map, path)?;
    Ok(infos.into_iter().map(|t| t.into_raw(&file)).collect())
}

/// Parse the header of safetensors bytes `buf` (the whole file); `path` names it in errors.
/// Untrusted input: every length and offset is checked against `buf` before use.
pub fn parse_safetensors(buf: &[u8], path: &Path) -> Result<Vec<TensorInfo>> {
    let bad = |msg: String| Error::dump(path, None, msg);
    if buf.len() < 8 {
        return Err(bad(format!(
            "truncated: {} bytes, a safetensors file starts with an 8-byte header length",
            buf.len()
        )));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER || n > (buf.len() - 8) as u64 {
        return Err(bad(format!(
            "header length {n} is beyond the file ({} bytes) or the 100 MB limit",
            buf.len()
        )));
    }
    let n = n as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&buf[8..8 + n])
        .map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
    let data_start = 8 + n;
    let data_len = buf.len() - data_start;
    let mut tensors = Vec::with_capacity(header.len());
    for (name, entry) in &header {
        if name == "__metadata__" {
            continue;
        }
        let terr = |msg: String| Error::dump(path, Some(name), msg);
        let dtype_tag = entry
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| terr("missing or non-string \"dtype\"".into()))?;
        let stored = match dtype_tag {
            "I32" => StoredType::I32,
            "I64" => StoredType::I64,
            tag => match DType::from_safetensors(tag) {
                Some(d) => StoredType::Float(d),
                None => StoredType::Other(match tag {
                    "F64" => "float64",
                    "F8_E4M3" => "float8_e4m3fn",
                    "F8_E5M2" => "float8_e5m2",
                    "I8" => "int8",
                    "U8" => "uint8",
                    "I16" => "int16",
                    "BOOL" => "bool",
                    _ => "an unknown dtype",
                }),
            },
        };
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| terr("missing \"shape\" array".into()))?
            .iter()
            .map(|v| v.as_u64().and_then(|x| usize::try_from(x).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| terr("shape entries must be non-negative integers".into()))?;
        let offs = entry
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| terr("missing \"data_offsets\" [begin, end]".into()))?;
        let (begin, end) = offs;
        if begin > end || end > data_len as u64 {
            return Err(terr(format!(
                "data offsets [{begin}, {end}] out of range: the file holds {data_len} data bytes (truncated?)"
            )));
        }
        let nbytes = (end - begin) as usize;
        if let Some(size) = stored.size() {
            let expect = shape
                .iter()
                .try_fold(size, |acc, &s| acc.checked_mul(s))
                .ok_or_else(|| terr(format!("shape {shape:?} overflows")))?;
            if expect != nbytes {
                return Err(terr(format!(
                    "shape {shape:?} of {} needs {expect} bytes but data_offsets span {nbytes}",
                    stored.name()
                )));
            }
        }
        tensors.push(TensorInfo {
            name: name.clone(),
            stored,
            shape,
            offset: data_start + begin as usize,
            nbytes,
        });
    }
    // Overlapping tensors mean a corrupt or crafted header.
    let mut spans: Vec<(usize, usize, &str)> = tensors
        .iter()
        .filter(|t| t.nbytes > 0)
        .map(|t| (t.offset, t.offset + t.nbytes, t.name.as_str()))
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(Error::dump(
                path,
                Some(w[1].2),
                format!("data overlaps tensor {}", w[0].2),
            ));
        }
    }
    // Keep the header order stable (serde_json's map is sorted by name).
    tensors.sort_by_key(|t| t.offset);
    Ok(tensors)
}

/// Read a `.npy` file's header (format versions 1-3, little-endian float32/float16, C order).
pub fn read_npy(path: &Path) -> Result<RawTensor> {
    let file = MappedFile::open(path)?;
    Ok(parse_npy(&file.map, path)?.into_raw(&file))
}

/// Parse the header of `.npy` bytes `buf` (the whole file); `path` names it in errors.
pub fn parse_npy(buf: &[u8], path: &Path) -> Result<TensorInfo> {
    let bad = |msg: String| Error::dump(path, None, msg);
    if buf.len() < 10 || &buf[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file (bad magic)".into()));
    }
    let (hlen, hstart) = match buf[6] {
        1 => (u16::from_le_bytes([buf[8], buf[9]]) as u64, 10usize),
        2 | 3 if buf.len() >= 12 => (
            u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes")) as u64,
            12usize,
        ),
        v => return Err(bad(format!("unsupported .npy format version {v}"))),
    };
    if hlen > MAX_HEADER || hstart as u64 + hlen > buf.len() as u64 {
        return Err(bad(format!(
            "header length {hlen} is beyond the file ({} bytes)",
            buf.len()
        )));
    }
    let header = std::str::from_utf8(&buf[hstart..hstart + hlen as usize])
        .map_err(|_| bad("header is not text".into()))?;
    let field = |key: &str| -> Option<&str> {
        let i = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[i..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr")
        .and_then(|r| r.strip_prefix('\''))
        .and_then(|r| r.split('\'').next())
        .ok_or_else(|| bad(format!("header has no 'descr': {header}")))?;
    let dtype = match descr {
        "<f4" | "=f4" => DType::F32,
        "<f2" | "=f2" => DType::F16,
        other => {
            return Err(bad(format!(
                "unsupported dtype '{other}': .npy sites must be little-endian float32 or float16 (bfloat16 needs .safetensors)"
            )))
        }
    };
    let fortran =
        field("fortran_order").ok_or_else(|| bad("header has no 'fortran_order'".into()))?;
    if fortran.starts_with("True") {
        return Err(bad(
            "Fortran-ordered arrays are not supported: save with np.ascontiguousarray".into(),
        ));
    }
    let shape_txt = field("shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .ok_or_else(|| bad(format!("header has no 'shape': {header}")))?;
    let shape: Vec<usize> = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| bad(format!("bad shape ({shape_txt})")))?;
    let data_start = hstart + hlen as usize;
    let nbytes = shape
        .iter()
        .try_fold(dtype.size(), |a, &s| a.checked_mul(s))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    if buf.len() - data_start < nbytes {
        return Err(bad(format!(
            "truncated: shape {shape:?} needs {nbytes} data bytes, the file holds {}",
            buf.len() - data_start
        )));
    }
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(TensorInfo {
        name,
        stored: StoredType::Float(dtype),
        shape,
        offset: data_start,
        nbytes,
    })
}

/// A parsed dump manifest: its sites with their dims, and its shards, in file order.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub sites: Vec<(String, usize)>,
    /// (file relative to the dump directory, tokens if stated)
    pub shards: Vec<(String, Option<u64>)>,
    pub value: Value,
}

/// Parse and validate `manifest.json` bytes; `path` names the file in errors. Shard paths must
/// stay inside the dump directory (no `..`, no absolute paths).
pub fn parse_manifest(bytes: &[u8], path: &Path) -> Result<Manifest> {
    let bad = |msg: String| Error::dump(path, None, msg);
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    if value.get("format").and_then(Value::as_str) != Some("rank1fast.dump") {
        return Err(bad("\"format\" is not \"rank1fast.dump\"".into()));
    }
    match value.get("version").and_then(Value::as_u64) {
        Some(1) => {}
        v => {
            return Err(bad(format!(
                "unsupported dump version {v:?} (this reader knows 1)"
            )))
        }
    }
    let mut sites = Vec::new();
    for (name, s) in value
        .get("sites")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("missing \"sites\" object".into()))?
    {
        let dim = s
            .get("dim")
            .and_then(Value::as_u64)
            .and_then(|d| usize::try_from(d).ok())
            .filter(|&d| d > 0)
            .ok_or_else(|| bad(format!("site {name:?} has no positive integer \"dim\"")))?;
        sites.push((name.clone(), dim));
    }
    let mut shards = Vec::new();
    for shard in value
        .get("shards")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing \"shards\" array".into()))?
    {
        let file = shard
            .get("file")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("a shard has no \"file\"".into()))?;
        let rel = Path::new(file);
        let inside =
            !file.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !inside {
            return Err(bad(format!(
                "shard path {file:?} leaves the dump directory"
            )));
        }
        shards.push((file.to_owned(), shard.get("tokens").and_then(Value::as_u64)));
    }
    Ok(Manifest {
        sites,
        shards,
        value,
    })
}

fn open_dump(dir: &Path, manifest_path: &Path) -> Result<Sources> {
    let bytes = std::fs::read(manifest_path).map_err(|e| Error::io(manifest_path, e))?;
    let manifest = parse_manifest(&bytes, manifest_path)?;
    let dims: BTreeMap<String, usize> = manifest.sites.iter().cloned().collect();
    let mut sources = Sources::default();
    for (file, tokens) in &manifest.shards {
        let path = dir.join(file);
        let tensors = read_safetensors(&path)?;
        for name in dims.keys() {
            if !tensors.iter().any(|t| &t.name == name) {
                return Err(Error::dump(
                    &path,
                    Some(name),
                    "site listed in the manifest is missing",
                ));
            }
        }
        if let Some(tokens) = *tokens {
            for t in tensors.iter().filter(|t| dims.contains_key(&t.name)) {
                if t.shape.first().copied() != Some(tokens as usize) {
                    return Err(Error::dump(
                        &path,
                        Some(&t.name),
                        format!(
                            "manifest says {tokens} tokens, tensor shape is {:?}",
                            t.shape
                        ),
                    ));
                }
            }
        }
        add_safetensors_sites(&path, tensors, &mut sources, Some(&dims))?;
    }
    // Keep the manifest's site order.
    let mut ordered = Vec::new();
    for (name, _) in &manifest.sites {
        if let Some(i) = sources.sites.iter().position(|(n, _)| n == name) {
            ordered.push(sources.sites.swap_remove(i));
        }
    }
    sources.sites = ordered;
    if sources.sites.is_empty() {
        return Err(Error::dump(
            manifest_path,
            None,
            "the dump holds no shard yet",
        ));
    }
    sources.manifest = Some(manifest.value);
    Ok(sources)
}
