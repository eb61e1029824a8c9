//! Writing: output shards assembled from copied byte ranges and merged chunks (a writer
//! thread, buffers in flight), the other files of the checkpoint, and the output directory
//! made in a sibling temporary directory and renamed into place.

use super::*;
use std::io;

pub(super) fn check_cancel(progress: &Progress) -> Result<()> {
    if progress.cancel.load(Ordering::Relaxed) {
        Err(Error::Cancelled)
    } else {
        Ok(())
    }
}

/// Copy `len` bytes of `src` from `start` to the end of `out`, in pieces, in the kernel where
/// the platform can.
pub(super) fn copy_range(
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
pub(super) enum Piece {
    /// Bytes `[start, start + len)` of the input shard, copied as they are.
    Copy { start: u64, len: u64 },
    /// The first `len` bytes of a computed buffer, which then goes back for reuse.
    Merged(Vec<u8>, usize),
}

/// Chunk buffers circulating between the computing side and the writer: one being computed,
/// one queued, one being written.
pub(super) const BUFFERS: usize = 3;

/// Write one output shard: the writer thread appends the pieces in order (untouched ranges
/// copied, merged chunks written) while this thread computes the next chunks, rows in
/// parallel. Writing into the page cache costs about as much as the arithmetic, and the two
/// overlap, across targets too (a copy between two targets overlaps the second's first chunks).
pub(super) fn write_shard(
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
pub(super) fn compute_merged(
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
pub(super) fn release_pages(map: &Mmap, begin: usize, end: usize) {
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

pub(super) fn create_file(path: &Path) -> Result<File> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

pub(super) fn finish_file(out: File, path: &Path, perms: fs::Permissions) -> Result<()> {
    out.set_permissions(perms).map_err(|e| Error::io(path, e))
}

/// Every file and directory under `dir` except the shards and [`SKIPPED_ENTRIES`], relative
/// to `dir`, parents before children. Symbolic links are followed (hub cache snapshots are
/// links into a blob store).
pub(super) fn other_entries(
    dir: &Path,
    shards: &HashSet<&Path>,
) -> Result<Vec<(PathBuf, bool, u64)>> {
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

pub(super) fn copy_file(src: &Path, dst: &Path, progress: &Progress) -> Result<()> {
    let f = File::open(src).map_err(|e| Error::io(src, e))?;
    let meta = f.metadata().map_err(|e| Error::io(src, e))?;
    let mut out = create_file(dst)?;
    copy_range(&f, src, 0, meta.len(), &mut out, dst, progress)?;
    finish_file(out, dst, meta.permissions())
}

// --------------------------------------------------------------------------- output directory

/// `path` made absolute with symbolic links resolved as far as it exists.
pub(super) fn resolved(path: &Path) -> PathBuf {
    if let Ok(p) = fs::canonicalize(path) {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => resolved(parent).join(name),
        _ => std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
    }
}

pub(super) fn check_out_dir(
    out: &Path,
    model_dir: &Path,
    adapter: &Path,
    overwrite: bool,
) -> Result<()> {
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

pub(super) fn sibling(out: &Path, tag: &str) -> PathBuf {
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
pub(super) struct TempDir(pub(super) Option<PathBuf>);

impl TempDir {
    pub(super) fn path(&self) -> &Path {
        self.0.as_deref().expect("temporary directory")
    }
    pub(super) fn keep(mut self) -> PathBuf {
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
pub(super) fn install(tmp: TempDir, out: &Path) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::testutil::*;
    use serde_json::json;

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
}
