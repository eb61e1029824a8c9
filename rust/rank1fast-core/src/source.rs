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
    /// Any other dtype of the safetensors format, kept by its torch-style name so errors can
    /// say what it is (see [`SAFETENSORS_DTYPES`]).
    Other(&'static str),
}

/// Every dtype tag of the safetensors format (huggingface/safetensors `safetensors/src/tensor.rs`,
/// `enum Dtype` and `Dtype::bitsize`): (tag, torch-style name, bits per element). Sub-byte
/// types (F4, F6_*) are valid only where a tensor's bits fill whole bytes.
pub const SAFETENSORS_DTYPES: &[(&str, &str, usize)] = &[
    ("BOOL", "bool", 8),
    ("F4", "float4_e2m1fn", 4),
    ("F6_E2M3", "float6_e2m3fn", 6),
    ("F6_E3M2", "float6_e3m2fn", 6),
    ("U8", "uint8", 8),
    ("I8", "int8", 8),
    ("F8_E5M2", "float8_e5m2", 8),
    ("F8_E4M3", "float8_e4m3fn", 8),
    ("F8_E8M0", "float8_e8m0fnu", 8),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz", 8),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz", 8),
    ("I16", "int16", 16),
    ("U16", "uint16", 16),
    ("F16", "float16", 16),
    ("BF16", "bfloat16", 16),
    ("I32", "int32", 32),
    ("U32", "uint32", 32),
    ("F32", "float32", 32),
    ("C64", "complex64", 64),
    ("F64", "float64", 64),
    ("I64", "int64", 64),
    ("U64", "uint64", 64),
];

impl StoredType {
    /// The type of a safetensors dtype tag, with its bits per element; None for an unknown tag.
    pub fn from_safetensors(tag: &str) -> Option<(Self, usize)> {
        let &(_, name, bits) = SAFETENSORS_DTYPES.iter().find(|(t, _, _)| *t == tag)?;
        let stored = match tag {
            "I32" => StoredType::I32,
            "I64" => StoredType::I64,
            _ => match DType::from_safetensors(tag) {
                Some(d) => StoredType::Float(d),
                None => StoredType::Other(name),
            },
        };
        Some((stored, bits))
    }

    /// Bits per element.
    pub fn bits(self) -> usize {
        match self {
            StoredType::Float(d) => 8 * d.size(),
            StoredType::I32 => 32,
            StoredType::I64 => 64,
            StoredType::Other(n) => SAFETENSORS_DTYPES
                .iter()
                .find(|(_, name, _)| *name == n)
                .map_or(8, |&(_, _, bits)| bits),
        }
    }

    /// The torch-style name ("float32", "int64", "float8_e4m3fn").
    pub fn name(self) -> &'static str {
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
    /// Tensors of bare files passed over for their shape (`name [shape]`), for the error
    /// when no site is found.
    skipped: Vec<String>,
}

impl Sources {
    /// Leave out tensors with no rows (`[0, d]`); a site left with none is an error, as its
    /// statistics would be empty (NaN means, infinite extrema).
    fn drop_empty(&mut self) -> Result<()> {
        for (name, list) in &mut self.sites {
            if list.iter().all(|s| s.rows == 0) {
                let s = &list[0];
                return Err(Error::dump(
                    s.path(),
                    Some(name),
                    format!(
                        "the site has no rows (shape {:?}): nothing to analyze",
                        s.tensor.shape
                    ),
                ));
            }
            list.retain(|s| s.rows > 0);
        }
        Ok(())
    }

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
        let skipped = match sources.skipped.as_slice() {
            [] => String::new(),
            s if s.len() <= 5 => format!(" (passed over: {})", s.join(", ")),
            s => format!(
                " (passed over: {} and {} more)",
                s[..5].join(", "),
                s.len() - 5
            ),
        };
        return Err(Error::dump(
            path,
            None,
            format!("no 2-D [tokens, dim] or 3-D [batch, seq, dim] float tensor found{skipped}"),
        ));
    }
    sources.drop_empty()?;
    Ok(sources)
}

fn extension(p: &Path) -> Option<String> {
    p.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
}

fn open_file(path: &Path, sources: &mut Sources) -> Result<()> {
    let ext = extension(path);
    let want = match ext.as_deref() {
        Some("safetensors") => "a safetensors file",
        Some("npy") => "a .npy file",
        _ => {
            return Err(Error::dump(
                path,
                None,
                "unknown file type: expected .safetensors, .npy or a dump directory",
            ))
        }
    };
    let file = MappedFile::open(path)?;
    if let Some(is) = sniff(&file.map, file.map.len() as u64).filter(|&k| k != want) {
        return Err(Error::dump(
            path,
            None,
            format!("is {is}, not {want} as its name says"),
        ));
    }
    if want == "a .npy file" {
        let t = parse_npy(&file.map, path)?.into_raw(&file);
        let name = t.name.clone();
        let src = site_source(path, &name, t, None, None)?;
        sources.push(name, src)
    } else {
        let tensors = parse_safetensors(&file.map, path)?
            .into_iter()
            .map(|t| t.into_raw(&file))
            .collect();
        add_safetensors_sites(path, tensors, sources, None)
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
            None if !(t.shape.len() == 2 || t.shape.len() == 3) => {
                sources.skipped.push(format!("{} {:?}", t.name, t.shape));
                continue;
            }
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

/// The entries of a JSON object in file order, duplicates kept (serde_json's map would keep
/// only the last of two equal keys, silently).
struct Entries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Parse the header of safetensors bytes `buf` (the whole file); `path` names it in errors.
///
/// Untrusted input: every length and offset is checked against `buf` before use. A file is
/// accepted exactly when the reference reader (huggingface/safetensors
/// `SafeTensors::read_metadata` and `Metadata::validate`) accepts it: a header length within
/// the file and at most 100,000,000; a UTF-8 JSON object (whitespace padding allowed);
/// `__metadata__`, when present, maps strings to strings; every tensor has a known dtype tag, a
/// shape and `data_offsets`; sorted by offset, the tensors cover the data section exactly, with
/// no overlap, gap or trailing byte; each spans the bytes its shape needs (zero-size tensors
/// span none). A key given twice is refused too: the reference keeps the last one silently.
pub fn parse_safetensors(buf: &[u8], path: &Path) -> Result<Vec<TensorInfo>> {
    parse_safetensors_head(buf, buf.len() as u64, path)
}

/// [`parse_safetensors`] from the file's first bytes `head` and its length `file_len` (for files
/// read as a stream, e.g. inside an archive): `head` holds the 8-byte length and the header, or
/// at least as much of them as the file has; the data is not needed.
pub fn parse_safetensors_head(head: &[u8], file_len: u64, path: &Path) -> Result<Vec<TensorInfo>> {
    let buf = head;
    let bad = |msg: String| Error::dump(path, None, msg);
    if file_len < 8 || buf.len() < 8 {
        return Err(bad(format!(
            "truncated: {file_len} bytes, a safetensors file starts with an 8-byte header length"
        )));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER || n > file_len - 8 {
        return Err(bad(format!(
            "header length {n} is beyond the file ({file_len} bytes) or the 100 MB limit{}",
            sniff(buf, file_len)
                .map(|k| format!(": {k}"))
                .unwrap_or_default()
        )));
    }
    if (buf.len() as u64) < 8 + n {
        return Err(bad(format!(
            "the header needs {n} bytes, only {} were read",
            buf.len() - 8
        )));
    }
    let n = n as usize;
    let text = std::str::from_utf8(&buf[8..8 + n])
        .map_err(|e| bad(format!("header is not UTF-8 text: {e}")))?;
    let Entries(header) =
        serde_json::from_str(text).map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
    let data_start = 8 + n;
    let data_len = (file_len - data_start as u64) as usize;
    let mut seen = std::collections::HashSet::with_capacity(header.len());
    let mut tensors = Vec::with_capacity(header.len());
    for (name, entry) in &header {
        let terr = |msg: String| Error::dump(path, Some(name), msg);
        if !seen.insert(name.as_str()) {
            return Err(terr("the header names this key twice".into()));
        }
        if name == "__metadata__" {
            let meta = entry
                .as_object()
                .ok_or_else(|| terr("must be an object of string values".into()))?;
            if let Some((k, v)) = meta.iter().find(|(_, v)| !v.is_string()) {
                return Err(terr(format!(
                    "value of {k:?} is {}, the format allows only strings",
                    json_kind(v)
                )));
            }
            continue;
        }
        if !entry.is_object() {
            return Err(terr(format!(
                "is {}, expected an object with dtype, shape and data_offsets",
                json_kind(entry)
            )));
        }
        let dtype_tag = entry
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| terr("missing or non-string \"dtype\"".into()))?;
        let (stored, bits) = StoredType::from_safetensors(dtype_tag).ok_or_else(|| {
            terr(format!(
                "unknown dtype tag {dtype_tag:?} (the format knows {})",
                SAFETENSORS_DTYPES
                    .iter()
                    .map(|(t, _, _)| *t)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| terr("missing \"shape\" array".into()))?
            .iter()
            .map(|v| v.as_u64().and_then(|x| usize::try_from(x).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| terr("shape entries must be non-negative integers".into()))?;
        let (begin, end) = entry
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| terr("missing \"data_offsets\" [begin, end]".into()))?;
        if begin > end || end > data_len as u64 {
            return Err(terr(format!(
                "data offsets [{begin}, {end}] out of range: the file holds {data_len} data bytes (truncated?)"
            )));
        }
        let nbytes = (end - begin) as usize;
        let nbits = shape
            .iter()
            .try_fold(bits, |acc, &s| acc.checked_mul(s))
            .ok_or_else(|| terr(format!("shape {shape:?} overflows")))?;
        if nbits % 8 != 0 {
            return Err(terr(format!(
                "shape {shape:?} of {} fills {nbits} bits, not whole bytes",
                stored.name()
            )));
        }
        if nbits / 8 != nbytes {
            return Err(terr(format!(
                "shape {shape:?} of {} needs {} bytes but data_offsets span {nbytes}",
                stored.name(),
                nbits / 8
            )));
        }
        tensors.push(TensorInfo {
            name: name.clone(),
            stored,
            shape,
            offset: data_start + begin as usize,
            nbytes,
        });
    }
    // The reference's layout rule: in offset order, each tensor starts where the previous ends.
    tensors.sort_by_key(|t| (t.offset, t.offset + t.nbytes));
    let mut end = data_start;
    let mut last: Option<&str> = None;
    for t in &tensors {
        if t.offset < end {
            return Err(Error::dump(
                path,
                Some(&t.name),
                format!("data overlaps tensor {}", last.unwrap_or("?")),
            ));
        }
        if t.offset > end {
            return Err(Error::dump(
                path,
                Some(&t.name),
                format!(
                    "{} unused bytes before this tensor's data (offset {}): tensors must be \
                     packed without gaps",
                    t.offset - end,
                    end - data_start
                ),
            ));
        }
        end = t.offset + t.nbytes;
        last = Some(&t.name);
    }
    if end as u64 != file_len {
        return Err(bad(format!(
            "{} bytes after the last tensor's data: the tensors must end where the file ends",
            file_len - end as u64
        )));
    }
    Ok(tensors)
}

/// The `__metadata__` strings of safetensors bytes that [`parse_safetensors`] accepted.
pub fn safetensors_metadata(buf: &[u8]) -> Vec<(String, String)> {
    let n = buf.get(..8).map_or(0, |b| {
        u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize
    });
    let header: Value = buf
        .get(8..8usize.saturating_add(n))
        .and_then(|h| serde_json::from_slice(h).ok())
        .unwrap_or_default();
    header
        .get("__metadata__")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// What a file is, from its first bytes `head` and its length: "a safetensors file", "a .npy
/// file", "a GGUF file", "a zip archive (torch.save writes these)", "a pickle (torch.save's
/// legacy format)", or None.
pub fn sniff(head: &[u8], file_len: u64) -> Option<&'static str> {
    let buf = head;
    if buf.starts_with(b"\x93NUMPY") {
        Some("a .npy file")
    } else if buf.starts_with(b"GGUF") {
        Some("a GGUF file")
    } else if buf.starts_with(b"PK\x03\x04") || buf.starts_with(b"PK\x05\x06") {
        Some("a zip archive (torch.save writes these)")
    } else if looks_like_safetensors(buf, file_len) {
        // Before the pickle test: a header length whose low bytes are 0x80 0x02..0x05 (a
        // 1,408-byte header, say) starts like a pickle's protocol marker.
        Some("a safetensors file")
    } else if buf.len() >= 2 && buf[0] == 0x80 && (2..=5).contains(&buf[1]) {
        Some("a pickle (torch.save's legacy format)")
    } else {
        None
    }
}

/// An 8-byte little-endian header length that fits the file, then (after whitespace) `{`.
fn looks_like_safetensors(buf: &[u8], file_len: u64) -> bool {
    if buf.len() <= 9 {
        return false;
    }
    let brace = buf[8..]
        .iter()
        .take(4096)
        .find(|b| !b.is_ascii_whitespace())
        == Some(&b'{');
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    brace && n <= file_len.saturating_sub(8)
}

/// Read a `.npy` file's header (format versions 1-3, little-endian float32/float16, C order;
/// Fortran order, big-endian, structured and raw 2-byte (ml_dtypes bfloat16) arrays are refused
/// by name).
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
    if field("descr").is_some_and(|r| r.starts_with('[')) {
        return Err(bad(
            "structured dtype (a record array): .npy sites must be plain float32 or float16 \
             arrays"
                .into(),
        ));
    }
    let descr = field("descr")
        .and_then(|r| r.strip_prefix('\''))
        .and_then(|r| r.split('\'').next())
        .ok_or_else(|| bad(format!("header has no 'descr': {header}")))?;
    let dtype = match descr {
        "<f4" | "=f4" => DType::F32,
        "<f2" | "=f2" => DType::F16,
        ">f4" | ">f2" => {
            return Err(bad(format!(
                "big-endian dtype '{descr}': .npy sites must be little-endian (save \
                 x.astype(x.dtype.newbyteorder('<')))"
            )))
        }
        "<V2" | "|V2" => {
            return Err(bad(format!(
                "2-byte raw dtype '{descr}' (how numpy stores ml_dtypes.bfloat16): the file \
                 does not say it is bfloat16; save bfloat16 sites as .safetensors"
            )))
        }
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
    match value.get("version") {
        Some(v) if v.as_u64() == Some(1) => {}
        Some(v) => {
            return Err(bad(format!(
                "unsupported dump version {v} (this reader knows 1)"
            )))
        }
        None => return Err(bad("no \"version\" (this reader knows 1)".into())),
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
        if shards.iter().any(|(f, _)| f == file) {
            return Err(bad(format!(
                "shard {file:?} is listed twice (its tokens would count twice)"
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
        for t in tensors.iter().filter(|t| dims.contains_key(&t.name)) {
            let said = manifest.value["sites"][&t.name]["dtype"].as_str();
            let have = match t.stored {
                StoredType::Float(d) => d.name(),
                StoredType::I32 => "int32",
                StoredType::I64 => "int64",
                StoredType::Other(name) => name,
            };
            if let Some(said) = said.filter(|&said| said != have) {
                return Err(Error::dump(
                    &path,
                    Some(&t.name),
                    format!("manifest says dtype {said} but the tensor is {have}"),
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
    sources.drop_empty()?;
    sources.manifest = Some(manifest.value);
    Ok(sources)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file from a raw JSON header and `data` bytes.
    fn st(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    fn err(buf: &[u8]) -> String {
        parse_safetensors(buf, Path::new("f.safetensors"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_header_length_that_starts_like_a_pickle_is_still_safetensors() {
        // 0x0580 = 1408 bytes of header: the file starts 0x80 0x05, a pickle's protocol 5.
        let header = format!(
            "{{\"__metadata__\":{{\"x\":\"{}\"}}}}",
            "y".repeat(1408 - 25)
        );
        assert_eq!(header.len(), 1408);
        let file = st(&header, &[]);
        assert_eq!(&file[..2], &[0x80, 0x05]);
        assert_eq!(sniff(&file, file.len() as u64), Some("a safetensors file"));
        assert_eq!(
            sniff(&[0x80, 0x02, b'}', 0, 0], 5),
            Some("a pickle (torch.save's legacy format)")
        );
    }

    #[test]
    fn safetensors_accepts_what_the_reference_accepts() {
        // Zero-size tensors anywhere in the order, leading and trailing whitespace padding.
        let h = r#"  {"e":{"dtype":"I32","shape":[2,0],"data_offsets":[0,0]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"z":{"dtype":"BF16","shape":[0],"data_offsets":[8,8]}}  "#;
        let t = parse_safetensors(&st(h, &[0; 8]), Path::new("f")).unwrap();
        let names: Vec<_> = t.iter().map(|t| (t.name.as_str(), t.nbytes)).collect();
        assert_eq!(names, [("e", 0), ("a", 8), ("z", 0)]);
        // F8 and F4 parse (as data they are refused by name when used as a site).
        let h = r#"{"__metadata__":{"k":"v"},"q":{"dtype":"F8_E4M3","shape":[3],"data_offsets":[0,3]},"p":{"dtype":"F4","shape":[4],"data_offsets":[3,5]}}"#;
        let t = parse_safetensors(&st(h, &[0; 5]), Path::new("f")).unwrap();
        assert_eq!(t[0].stored, StoredType::Other("float8_e4m3fn"));
        assert_eq!(t[1].stored, StoredType::Other("float4_e2m1fn"));
        assert_eq!(t[1].stored.bits(), 4);
    }

    #[test]
    fn safetensors_refuses_what_the_reference_refuses() {
        let two = |a: &str, b: &str, n: usize| {
            st(
                &format!(
                    r#"{{"a":{{"dtype":"F32","shape":[2],"data_offsets":{a}}},"b":{{"dtype":"F32","shape":[2],"data_offsets":{b}}}}}"#
                ),
                &vec![0; n],
            )
        };
        assert_eq!(
            err(&two("[0,8]", "[16,24]", 24)),
            "f.safetensors [b]: 8 unused bytes before this tensor's data (offset 8): tensors \
             must be packed without gaps"
        );
        assert_eq!(
            err(&two("[0,8]", "[4,12]", 12)),
            "f.safetensors [b]: data overlaps tensor a"
        );
        assert_eq!(
            err(&two("[0,8]", "[8,16]", 20)),
            "f.safetensors: 4 bytes after the last tensor's data: the tensors must end where \
             the file ends"
        );
        let dup = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#;
        assert_eq!(
            err(&st(dup, &[0; 16])),
            "f.safetensors [a]: the header names this key twice"
        );
        let meta =
            r#"{"__metadata__":{"step":3},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        assert_eq!(
            err(&st(meta, &[0; 8])),
            "f.safetensors [__metadata__]: value of \"step\" is a number, the format allows \
             only strings"
        );
        let tag = r#"{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#;
        assert!(err(&st(tag, &[0; 16])).starts_with(
            "f.safetensors [a]: unknown dtype tag \"F128\" (the format knows BOOL, F4,"
        ));
        let odd = r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#;
        assert_eq!(
            err(&st(odd, &[0; 2])),
            "f.safetensors [a]: shape [3] of float4_e2m1fn fills 12 bits, not whole bytes"
        );
        assert_eq!(
            err(&st("[1, 2]", &[])),
            "f.safetensors: header is not a JSON object: invalid type: sequence, expected a \
             JSON object at line 1 column 0"
        );
        let mut zip = b"PK\x03\x04".to_vec();
        zip.extend_from_slice(&[0xff; 60]);
        assert!(err(&zip).ends_with(": a zip archive (torch.save writes these)"));
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn open_err(p: &Path) -> String {
        let dir = p.parent().unwrap().display().to_string();
        open(p).unwrap_err().to_string().replace(&dir, "")
    }

    #[test]
    fn zero_row_sites_and_misnamed_files_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let h = r#"{"h":{"dtype":"F32","shape":[0,4],"data_offsets":[0,0]}}"#;
        let p = write(d.path(), "e.safetensors", &st(h, &[]));
        assert_eq!(
            open_err(&p),
            "/e.safetensors [h]: the site has no rows (shape [0, 4]): nothing to analyze"
        );
        // A zero-row tensor beside others of the same site is left out.
        let h2 = r#"{"h":{"dtype":"F32","shape":[1,4],"data_offsets":[0,16]}}"#;
        write(d.path(), "f.safetensors", &st(h2, &[0; 16]));
        let s = open(d.path()).unwrap();
        assert_eq!(s.sites[0].1.len(), 1);
        assert_eq!(s.sites[0].1[0].rows, 1);

        let p = write(d.path(), "t.npy", &st(h2, &[0; 16]));
        assert_eq!(
            open_err(&p),
            "/t.npy: is a safetensors file, not a .npy file as its name says"
        );
        let p = write(d.path(), "g.safetensors", b"GGUF\x03\x00\x00\x00rest");
        assert_eq!(
            open_err(&p),
            "/g.safetensors: is a GGUF file, not a safetensors file as its name says"
        );
    }

    fn npy(descr: &str, fortran: bool, shape: &str, data: usize) -> Vec<u8> {
        let mut h = format!(
            "{{'descr': {descr}, 'fortran_order': {}, 'shape': {shape}, }}",
            if fortran { "True" } else { "False" }
        )
        .into_bytes();
        h.push(b'\n');
        let mut v = b"\x93NUMPY\x01\x00".to_vec();
        v.extend_from_slice(&(h.len() as u16).to_le_bytes());
        v.extend_from_slice(&h);
        v.extend(std::iter::repeat_n(0u8, data));
        v
    }

    #[test]
    fn npy_variants_are_named() {
        let e = |b: &[u8]| parse_npy(b, Path::new("x.npy")).unwrap_err().to_string();
        assert_eq!(
            e(&npy("'>f4'", false, "(2, 2)", 16)),
            "x.npy: big-endian dtype '>f4': .npy sites must be little-endian (save \
             x.astype(x.dtype.newbyteorder('<')))"
        );
        assert!(e(&npy("'<V2'", false, "(2, 2)", 8))
            .starts_with("x.npy: 2-byte raw dtype '<V2' (how numpy stores ml_dtypes.bfloat16)"));
        assert_eq!(
            e(&npy("[('a', '<f4'), ('b', '<f4')]", false, "(2,)", 16)),
            "x.npy: structured dtype (a record array): .npy sites must be plain float32 or \
             float16 arrays"
        );
        assert!(e(&npy("'<f4'", true, "(2, 2)", 16)).contains("Fortran-ordered"));
        let ok = parse_npy(&npy("'<f2'", false, "(3, 2)", 12), Path::new("x.npy")).unwrap();
        assert_eq!((ok.shape, ok.nbytes), (vec![3, 2], 12));
    }
}
