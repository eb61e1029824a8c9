"""Texts to collect activations on: the built-in default corpus and readers for corpus files.

The default corpus is English prose about programming, written by the Python developers: the
Python Language Reference as shipped in the standard library (``pydoc_data/topics.py``, the
text of ``help("assert")`` and friends) and the docstrings of the standard library modules,
filtered to prose paragraphs (no code, no doctests, no tables) and grouped into documents of a
few hundred tokens. It was built once from CPython 3.11.7 with :func:`build_default_corpus`
and ships as ``rank1fast/data/default_corpus.txt.gz``: 1,026 documents, 231,509 tokens of
SmolLM2, the longest 418. The same on every machine, it works offline. The documentation is
© the Python Software Foundation, distributed under the PSF License (see
``rank1fast/data/LICENSE-PSF.txt``).

Corpus files (:func:`read_texts`):

- ``.txt``: one document per block of lines; blocks are separated by blank lines (lines
  inside a block keep their line breaks);
- ``.jsonl``: one JSON object per line, the document in its ``"text"`` field;
- either may be gzip-compressed (``.txt.gz``, ``.jsonl.gz``).
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import IO, Union

from .errors import DumpError, InvalidArgumentError, PathNotFoundError

__all__ = ["default_corpus", "read_texts", "build_default_corpus", "DEFAULT_CORPUS_FILE"]

#: The shipped default corpus (gzip text, documents separated by blank lines).
DEFAULT_CORPUS_FILE = Path(__file__).parent / "data" / "default_corpus.txt.gz"

TextsArg = Union[str, os.PathLike, Iterable[str], None]  # noqa: UP007 (a runtime alias)

# Documents are grouped up to this many characters (≈ 350 SmolLM2 tokens): well under the
# default max_length of 512, so the default corpus is never truncated.
_DOC_CHARS = 1500
# Standard-library folders that hold tests, demos or GUI tooling rather than documentation.
_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "tkinter",
    "ensurepip",
    "site-packages",
    "dist-packages",
    "__pycache__",
}


def default_corpus() -> list[str]:
    """The built-in corpus: English prose from the Python documentation, one string per document.

    Returns:
        A fresh list of documents (the same on every machine, in the same order).

    Raises:
        PathNotFoundError: the package data file is missing (a broken install).

    Example:
        >>> docs = default_corpus()
        >>> len(docs) > 500
        True
    """
    return list(_default_corpus())


@lru_cache(maxsize=1)
def _default_corpus() -> tuple[str, ...]:
    if not DEFAULT_CORPUS_FILE.is_file():
        raise PathNotFoundError(f"{DEFAULT_CORPUS_FILE} is missing; reinstall rank1fast")
    return tuple(read_texts(DEFAULT_CORPUS_FILE))


def read_texts(texts: TextsArg) -> Iterator[str]:
    """Iterate over the documents of ``texts``.

    Args:
        texts: an iterable of strings (each one document); a path to a ``.txt`` file (blocks
            of lines separated by blank lines are documents) or a ``.jsonl`` file (the
            ``"text"`` field of each line), optionally gzip-compressed; or None for
            :func:`default_corpus`. A plain ``str`` is always a path: wrap a single text in a
            list.

    Returns:
        An iterator of documents, in file order. Files are streamed, not loaded whole.

    Raises:
        PathNotFoundError: the file does not exist.
        InvalidArgumentError: an unknown file type, or an item that is not a string.
        DumpError: a ``.jsonl`` line that is not JSON or has no string ``"text"`` (the
            message names the file and line).

    Example:
        >>> list(read_texts(["one document", "another"]))
        ['one document', 'another']
    """
    if texts is None:
        return iter(_default_corpus())
    if isinstance(texts, (str, os.PathLike)):
        path = Path(texts)
        if not path.is_file():
            raise PathNotFoundError(f"corpus file {path} does not exist")
        return _read_file(path)
    if isinstance(texts, (bytes, bytearray)):
        raise InvalidArgumentError("texts must be strings, a path, or None; got bytes")
    return _check_strings(texts)


def _check_strings(texts: Iterable[str]) -> Iterator[str]:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidArgumentError(f"texts[{i}] is a {type(text).__name__}, not a str")
        yield text


def _open(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_file(path: Path) -> Iterator[str]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind == ".jsonl":
        return _read_jsonl(path)
    if kind in (".txt", ".text", ".md"):
        return _read_txt(path)
    raise InvalidArgumentError(
        f"{path}: unknown corpus file type; expected .txt or .jsonl (optionally .gz)"
    )


def _read_txt(path: Path) -> Iterator[str]:
    with _open(path) as f:
        block: list[str] = []
        for line in f:
            line = line.rstrip("\r\n")
            if line.strip():
                block.append(line)
            elif block:
                yield "\n".join(block)
                block = []
        if block:
            yield "\n".join(block)


def _read_jsonl(path: Path) -> Iterator[str]:
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DumpError(f"{path}:{lineno}: not valid JSON: {e}") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DumpError(f'{path}:{lineno}: no string "text" field')
            yield text


# --------------------------------------------------------------------------- building


def build_default_corpus(out: str | os.PathLike[str] | None = None) -> list[str]:
    """Rebuild the default corpus from the running Python's documentation.

    Takes the Language Reference topics (``pydoc_data.topics``) and the docstrings of the
    standard library (read with :mod:`ast`, nothing is imported), keeps prose paragraphs
    (at least eight words, mostly letters, ending like a sentence, no indented or doctest
    lines), drops duplicates, and groups consecutive paragraphs of one source into documents
    of at most about 1500 characters. The result depends on the Python version; the shipped
    file was built with CPython 3.11.7.

    Args:
        out: where to write the corpus as gzip text (documents separated by blank lines);
            None writes nothing.

    Returns:
        The documents.

    Example:
        >>> docs = build_default_corpus()                 # doctest: +SKIP
        >>> build_default_corpus(DEFAULT_CORPUS_FILE)     # doctest: +SKIP
    """
    from pydoc_data.topics import topics

    sources: list[list[str]] = [_prose(topics[k]) for k in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files(stdlib):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        paragraphs: list[str] = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    paragraphs.extend(_prose(doc))
        sources.append(paragraphs)

    seen: set[str] = set()
    docs: list[str] = []
    for paragraphs in sources:
        current: list[str] = []
        size = 0
        for p in paragraphs:
            if p in seen:
                continue
            seen.add(p)
            if current and size + len(p) > _DOC_CHARS:
                docs.append("\n".join(current))
                current, size = [], 0
            current.append(p)
            size += len(p) + 1
        if current:
            docs.append("\n".join(current))
    if out is not None:
        data = "\n\n".join(docs).encode("utf-8") + b"\n"
        # mtime=0: the same corpus gives the same bytes.
        with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(data)
    return docs


def _stdlib_files(stdlib: Path) -> list[Path]:
    files: list[Path] = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        files.extend(Path(root) / n for n in sorted(names) if n.endswith(".py"))
    return files


def _prose(text: str) -> list[str]:
    """The prose paragraphs of a docstring or help topic, each on one line."""
    out = []
    for par in re.split(r"\n\s*\n", text):
        lines = par.splitlines()
        if not lines or any(line.startswith((" ", "\t", ">>>", "*", "-", "=")) for line in lines):
            continue
        flat = " ".join(par.split())
        if len(flat.split()) < 8 or not flat.endswith((".", "?", "!", ":", ")")):
            continue
        if sum(c.isalpha() or c == " " for c in flat) < 0.85 * len(flat):
            continue
        out.append(flat)
    return out
