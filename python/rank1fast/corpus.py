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
from typing import IO, Any, Union

from .errors import CorpusError, InvalidArgumentError, PathNotFoundError

__all__ = [
    "default_corpus",
    "read_texts",
    "describe_corpus",
    "build_default_corpus",
    "DEFAULT_CORPUS_FILE",
    "CHAT_CORPUS_FILE",
    "CHAT_PROMPTS_FILE",
    "chat_conversations",
    "chat_texts",
    "render_chat",
    "has_chat_template",
    "served_corpus",
    "chat_prompts",
    "prose_texts",
    "build_chat_corpus",
]

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


def read_texts(texts: TextsArg, tokenizer: Any = None) -> Iterator[str]:
    """Iterate over the documents of ``texts``.

    Args:
        texts: an iterable of strings (each one document); a path to a ``.txt`` file (blocks
            of lines separated by blank lines are documents) or a ``.jsonl`` file (the
            ``"text"`` field of each line, or a chat conversation in its ``"messages"`` field:
            ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``, the format chat
            datasets use), optionally gzip-compressed; or None for :func:`default_corpus`. A
            plain ``str`` is always a path: wrap a single text in a list.
        tokenizer: renders chat conversations with the model's chat template
            (:func:`render_chat`); needed only for a ``.jsonl`` file that holds them.

    Returns:
        An iterator of documents, in file order. Files are streamed, not loaded whole.

    Raises:
        PathNotFoundError: the file does not exist.
        InvalidArgumentError: an unknown file type, or an item that is not a string.
        CorpusError: a ``.jsonl`` line that is not JSON, or has neither a string ``"text"``
            nor a well-formed ``"messages"`` list (the message names the file and line).
        InvalidArgumentError: a chat conversation but no tokenizer, or a tokenizer without a
            chat template.

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
        return _read_file(path, tokenizer)
    if isinstance(texts, (bytes, bytearray)):
        raise InvalidArgumentError("texts must be strings, a path, or None; got bytes")
    return _check_strings(texts)


def describe_corpus(texts: TextsArg) -> dict[str, Any]:
    """Where ``texts`` come from, as a dump's manifest records it: ``{"source": "default"}``,
    ``{"source": "file", "path": ...}`` or ``{"source": "iterable"}``.

    Example:
        >>> describe_corpus("corpus.txt")
        {'source': 'file', 'path': 'corpus.txt'}
    """
    if texts is None:
        return {"source": "default"}
    if isinstance(texts, (str, os.PathLike)):
        return {"source": "file", "path": os.fspath(texts)}
    return {"source": "iterable"}


def _check_strings(texts: Iterable[str]) -> Iterator[str]:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidArgumentError(f"texts[{i}] is a {type(text).__name__}, not a str")
        yield text


def _open(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_file(path: Path, tokenizer: Any = None) -> Iterator[str]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind == ".jsonl":
        return _read_jsonl(path, tokenizer)
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


def _read_jsonl(path: Path, tokenizer: Any = None) -> Iterator[str]:
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise CorpusError(f"{path}:{lineno}: not valid JSON: {e}") from None
            if isinstance(record, dict) and "messages" in record and "text" not in record:
                messages = _messages(record["messages"], f"{path}:{lineno}")
                if tokenizer is None:
                    raise InvalidArgumentError(
                        f"{path}:{lineno}: a chat conversation; rendering it needs the model's "
                        "tokenizer (collect/verify/convert pass it; read_texts(path, tokenizer))"
                    )
                yield render_chat(tokenizer, messages)
                continue
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise CorpusError(f'{path}:{lineno}: no string "text" field (nor chat "messages")')
            yield text


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise CorpusError(f'{where}: "messages" must be a non-empty list')
    out = []
    for i, m in enumerate(value):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise CorpusError(
                f'{where}: messages[{i}] must be {{"role": "system"|"user"|"assistant", '
                f'"content": str}}'
            )
        out.append({"role": role, "content": content})
    return out


# --------------------------------------------------------------------------- chat

#: Built-in user prompts (one per line), written for rank1fast: everyday questions, advice,
#: explanations, writing tasks, a little code and maths.
CHAT_PROMPTS_FILE = Path(__file__).parent / "data" / "chat_prompts.txt"
#: The shipped conversations (gzip JSONL, ``{"messages": [...]}`` per line): the built-in
#: prompts answered by the default model itself (:func:`build_chat_corpus`).
CHAT_CORPUS_FILE = Path(__file__).parent / "data" / "chat_corpus.jsonl.gz"
#: Every 8th conversation, from the 8th on, is held out for evaluation.
CHAT_EVAL_STRIDE, CHAT_EVAL_OFFSET = 8, 7
#: Every 64th document of the default corpus, from the 5th on, is kept for evaluation
#: (:func:`rank1fast.verify.default_eval_texts`; :func:`prose_texts` splits on it).
EVAL_STRIDE, EVAL_OFFSET = 64, 4
#: System prompts of the built-in conversations (None: the template's own default).
_SYSTEM_PROMPTS = (
    None,
    "You are a helpful assistant.",
    None,
    "You are a friendly, concise assistant.",
    None,
)
#: Second user turns of every 4th conversation (from the 3rd).
_FOLLOW_UPS = (
    "Can you give me a concrete example?",
    "Thanks! Can you say that more briefly?",
    "Why is that?",
    "Interesting. What else should I know?",
)

Conversation = list[dict[str, str]]


def chat_conversations(split: str = "all") -> list[Conversation]:
    """The built-in chat conversations (system prompt, user turns, assistant answers).

    Args:
        split: ``"fit"`` (7 of every 8), ``"eval"`` (every 8th, from the 8th: held out by
            :func:`rank1fast.convert` and the fidelity benchmark) or ``"all"``.

    Returns:
        A list of conversations, each a list of ``{"role", "content"}`` messages.

    Raises:
        InvalidArgumentError: an unknown split.
        PathNotFoundError: the package data file is missing (a broken install).

    Example:
        >>> len(chat_conversations("eval")) > 20
        True
    """
    convs = list(_chat_conversations())
    if split == "all":
        return convs
    if split not in ("fit", "eval"):
        raise InvalidArgumentError(f"split must be 'fit', 'eval' or 'all', got {split!r}")
    held = [i % CHAT_EVAL_STRIDE == CHAT_EVAL_OFFSET for i in range(len(convs))]
    return [c for c, h in zip(convs, held) if h == (split == "eval")]


@lru_cache(maxsize=1)
def _chat_conversations() -> tuple[Conversation, ...]:
    if not CHAT_CORPUS_FILE.is_file():
        raise PathNotFoundError(f"{CHAT_CORPUS_FILE} is missing; reinstall rank1fast")
    out = []
    with _open(CHAT_CORPUS_FILE) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                out.append(_messages(json.loads(line)["messages"], f"{CHAT_CORPUS_FILE}:{lineno}"))
    return tuple(out)


def has_chat_template(tokenizer: Any) -> bool:
    """True when ``tokenizer`` carries a chat template (an instruct / chat model)."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(
    tokenizer: Any, messages: Conversation, *, add_generation_prompt: bool = False
) -> str:
    """A conversation as the model sees it: its chat template applied, as text.

    A leading BOS token that the template writes and the tokenizer adds again on encoding is
    removed, so tokenizing the result gives the template's tokens exactly once.

    Args:
        tokenizer: a transformers tokenizer with a chat template.
        messages: ``[{"role": ..., "content": ...}, ...]``.
        add_generation_prompt: end with the assistant header (a prompt to answer).

    Returns:
        The rendered text.

    Raises:
        InvalidArgumentError: the tokenizer has no chat template.

    Example:
        >>> render_chat(tok, [{"role": "user", "content": "Hi"}])     # doctest: +SKIP
        '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM...'
    """
    if not has_chat_template(tokenizer):
        raise InvalidArgumentError(
            f"{type(tokenizer).__name__} has no chat template: chat conversations cannot be "
            "rendered for this model (use prose texts)"
        )
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        ids = tokenizer("x", add_special_tokens=True)["input_ids"]
        if ids and ids[0] == tokenizer.bos_token_id:
            text = text[len(bos) :]
    return text


def chat_texts(tokenizer: Any, split: str = "fit") -> list[str]:
    """The built-in conversations of ``split`` rendered with ``tokenizer``'s chat template.

    Example:
        >>> texts = chat_texts(tok, "eval")                               # doctest: +SKIP
    """
    return [render_chat(tokenizer, c) for c in chat_conversations(split)]


def prose_texts(split: str = "fit") -> list[str]:
    """The default prose corpus split as :func:`rank1fast.verify.default_eval_texts` holds
    out: ``"eval"`` is every 64th document from the 5th, ``"fit"`` the rest, interleaved
    (every 4th, then the next, ...) so that any prefix spreads over the whole corpus.

    Raises:
        InvalidArgumentError: an unknown split.

    Example:
        >>> len(prose_texts("eval"))
        16
    """
    if split not in ("fit", "eval"):
        raise InvalidArgumentError(f"split must be 'fit' or 'eval', got {split!r}")
    docs = default_corpus()
    held = [i % EVAL_STRIDE == EVAL_OFFSET for i in range(len(docs))]
    prose = [d for d, h in zip(docs, held) if h == (split == "eval")]
    if split == "fit":  # a stride spreads the documents over the corpus (sorted by source)
        prose = prose[::4] + prose[1::4] + prose[2::4] + prose[3::4]
    return prose


def chat_prompts(tokenizer: Any, split: str = "eval", limit: int | None = None) -> list[str]:
    """The first user turn of each built-in conversation of ``split``, rendered with the
    model's chat template and its assistant header: prompts for the model to answer.

    Example:
        >>> chat_prompts(tok, limit=1)[0].endswith("<|im_start|>assistant\\n")  # doctest: +SKIP
        True
    """
    out = []
    for conv in chat_conversations(split)[:limit]:
        first = next(i for i, m in enumerate(conv) if m["role"] == "user")
        out.append(render_chat(tokenizer, conv[: first + 1], add_generation_prompt=True))
    return out


def served_corpus(tokenizer: Any, split: str = "fit", *, prose_every: int = 4) -> list[str]:
    """The texts a model is served on, as :func:`rank1fast.convert` fits and verifies on them.

    For a model with a chat template: the built-in conversations rendered with it, with a
    prose document of the default corpus after every ``prose_every``-th conversation
    (``prose_every=0``: none). For a model without one: the default prose corpus. The
    ``"eval"`` split holds conversations and prose documents the ``"fit"`` split does not
    (the prose ones are :func:`rank1fast.verify.default_eval_texts`).

    Args:
        tokenizer: the model's tokenizer.
        split: ``"fit"`` or ``"eval"``.
        prose_every: interleave one prose document per this many conversations.

    Returns:
        A list of texts.

    Raises:
        InvalidArgumentError: an unknown split.

    Example:
        >>> texts = served_corpus(tok, "fit")                             # doctest: +SKIP
    """
    prose = prose_texts(split)
    if not has_chat_template(tokenizer):
        return prose
    chats = chat_texts(tokenizer, split)
    if prose_every <= 0:
        return chats
    out: list[str] = []
    it = iter(prose)
    for i, text in enumerate(chats, 1):
        out.append(text)
        if i % prose_every == 0:
            doc = next(it, None)
            if doc is not None:
                out.append(doc)
    return out


def build_chat_corpus(
    model: Any = None,
    out: str | os.PathLike[str] | None = None,
    *,
    max_new_tokens: int = 160,
    batch_size: int = 16,
    seed: int = 0,
    progress: Any = None,
) -> list[Conversation]:
    """Answer the built-in prompts with ``model`` and return (and write) the conversations.

    Each prompt of :data:`CHAT_PROMPTS_FILE` becomes a conversation: a system prompt on some
    (else the template's default), the user turn, the model's answer (sampled: temperature
    0.7, top-p 0.9, at most ``max_new_tokens``), and on every 4th a second user turn with its
    answer. The shipped :data:`CHAT_CORPUS_FILE` was made with the default model on a CPU
    (``python -c "from rank1fast.corpus import *; build_chat_corpus(None, CHAT_CORPUS_FILE)"``).

    Args:
        model: anything :func:`rank1fast.load_model` takes (None: the default model).
        out: where to write gzip JSONL (``{"messages": [...]}`` per line); None writes nothing.
        max_new_tokens: the longest answer, in tokens.
        batch_size: prompts answered per ``generate`` call.
        seed: the sampling seed (torch's generator is reseeded per batch).
        progress: a progress bar (None: on a terminal).

    Returns:
        The conversations.
    """
    import torch

    from ._progress import iter_progress
    from .models import load_model

    net, tok = load_model(model, quiet=progress is False)
    prompts = [p.strip() for p in CHAT_PROMPTS_FILE.read_text(encoding="utf-8").splitlines()]
    convs: list[Conversation] = []
    for i, p in enumerate(prompts):
        if not p:
            continue
        system = _SYSTEM_PROMPTS[i % len(_SYSTEM_PROMPTS)]
        convs.append(
            ([{"role": "system", "content": system}] if system else [])
            + [{"role": "user", "content": p}]
        )
    follow = [i for i in range(len(convs)) if i % 4 == 2]
    bar = iter_progress(progress, len(convs) + len(follow), "answer", unit="conv")

    def answer(indices: list[int]) -> None:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            texts = [render_chat(tok, convs[i], add_generation_prompt=True) for i in chunk]
            side = tok.padding_side
            tok.padding_side = "left"
            try:
                enc = tok(texts, return_tensors="pt", padding=True)
            finally:
                tok.padding_side = side
            enc = {k: v.to(next(net.parameters()).device) for k, v in enc.items()}
            torch.manual_seed(seed + start)
            with torch.no_grad():
                ids = net.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=True,
                    temperature=0.7,
                    top_p=0.9,
                    pad_token_id=tok.pad_token_id,
                )
            for i, row in zip(chunk, ids[:, enc["input_ids"].shape[1] :]):
                text = tok.decode(row, skip_special_tokens=True).strip()
                convs[i].append({"role": "assistant", "content": text})
            bar.update(len(chunk))

    try:
        answer(list(range(len(convs))))
        for n, i in enumerate(follow):
            convs[i].append({"role": "user", "content": _FOLLOW_UPS[n % len(_FOLLOW_UPS)]})
        answer(follow)
    finally:
        bar.close()
    if out is not None:
        lines = "".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in convs)
        with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(lines.encode("utf-8"))
    return convs


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
