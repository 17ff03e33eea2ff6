"""Offline text corpora in three clearly different domains, from what every Python
installation carries: Python source (the standard library's own files), JSON records
(generated, seeded), and English prose (the standard library's docstrings).

Each domain has disjoint `train` and `eval` splits (different files or record seeds), so
experts, classifiers and quantization calibration never see the held-out text.

Also here: a user's own text file read as documents, its deterministic held-out split, and
`out_of_distribution()`, generic text from none of the three domains (Python's licence and
its language reference), on which a quantized model's cost is reported but not gated.
"""

from __future__ import annotations

import inspect
import json
import random
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DOMAINS = ("python", "json", "prose")

# Standard-library packages whose files feed the python domain; the two splits never share a file.
_TRAIN_PACKAGES = ("json", "email", "http", "logging", "urllib", "xml", "concurrent", "importlib")
_EVAL_PACKAGES = ("asyncio", "unittest", "sqlite3")
_PROSE_TRAIN_MODULES = ("argparse", "collections", "dataclasses", "functools", "itertools",
                        "pathlib", "typing", "enum", "string", "textwrap", "datetime", "decimal",
                        "fractions", "statistics", "random", "heapq", "bisect", "contextlib")
_PROSE_EVAL_MODULES = ("subprocess", "threading", "socket", "shutil", "tempfile", "zipfile",
                       "tarfile", "csv", "pickle", "copy")


@dataclass(frozen=True)
class Split:
    train: tuple[str, ...]
    eval: tuple[str, ...]


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _python_files(packages: tuple[str, ...]) -> list[str]:
    texts = []
    for package in packages:
        root = _stdlib() / package
        files = sorted(root.rglob("*.py")) if root.is_dir() else [_stdlib() / f"{package}.py"]
        for f in files:
            if "test" in f.parts:
                continue
            text = f.read_text(encoding="utf-8", errors="replace")
            if len(text) > 500:
                texts.append(text)
    return texts


_WORDS = ("alpha", "beta", "gamma", "delta", "orion", "vega", "lyra", "cygnus", "draco",
          "pixel", "vector", "matrix", "tensor", "kernel", "socket", "buffer", "stream")
_CITIES = ("Paris", "Lagos", "Lima", "Osaka", "Oslo", "Quito", "Hanoi", "Perth", "Dakar")


def _json_records(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        record = {
            "id": rng.randrange(10**6),
            "name": f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}",
            "city": rng.choice(_CITIES),
            "active": rng.random() < 0.5,
            "score": round(rng.uniform(0, 100), 2),
            "tags": rng.sample(_WORDS, k=rng.randrange(1, 4)),
            "owner": {"user": f"u{rng.randrange(1000)}", "level": rng.randrange(1, 6)},
        }
        if rng.random() < 0.3:
            record["history"] = [{"t": rng.randrange(10**9), "v": rng.randrange(100)}
                                 for _ in range(rng.randrange(1, 4))]
        out.append(json.dumps(record, indent=rng.choice([None, 2])))
    # Group records into documents of a few dozen, as JSON Lines files look.
    return ["\n".join(out[i:i + 24]) for i in range(0, len(out), 24)]


def _docstrings(modules: tuple[str, ...]) -> list[str]:
    import importlib

    texts = []
    for name in modules:
        module = importlib.import_module(name)
        parts = [inspect.getdoc(module) or ""]
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc and len(doc) > 80 and getattr(obj, "__module__", None) == name:
                parts.append(doc)
        text = "\n\n".join(p for p in parts if p)
        if text:
            texts.append(text)
    return texts


@lru_cache(maxsize=None)
def corpus() -> dict[str, Split]:
    return {
        "python": Split(tuple(_python_files(_TRAIN_PACKAGES)), tuple(_python_files(_EVAL_PACKAGES))),
        "json": Split(tuple(_json_records(1, 2400)), tuple(_json_records(2, 600))),
        "prose": Split(tuple(_docstrings(_PROSE_TRAIN_MODULES)), tuple(_docstrings(_PROSE_EVAL_MODULES))),
    }


def token_windows(tokenizer, texts: tuple[str, ...], seq_len: int, count: int,
                  seed: int = 0) -> list[list[int]]:
    """`count` windows of exactly `seq_len` tokens, cut from the texts in a seeded order."""
    windows = available_windows(tokenizer, texts, seq_len, count, seed)
    if len(windows) < count:
        raise ValueError(f"corpus too small for {count} windows of {seq_len} tokens")
    return windows


def available_windows(tokenizer, texts: tuple[str, ...], seq_len: int, count: int,
                      seed: int = 0) -> list[list[int]]:
    """Up to `count` windows of exactly `seq_len` tokens (fewer when the texts run out)."""
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    windows: list[list[int]] = []
    buffer: list[int] = []
    for i in order:
        buffer += tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        while len(buffer) >= seq_len and len(windows) < count:
            windows.append(buffer[:seq_len])
            buffer = buffer[seq_len:]
        if len(windows) >= count:
            break
    return windows


def mixed_windows(tokenizer, split: str, seq_len: int, count: int, seed: int = 0) -> list[list[int]]:
    """Windows whose thirds come from different domains: text that switches domain
    mid-sequence, where per-token expert mixing matters."""
    third = -(-seq_len // 3)  # ceil: three parts always cover seq_len
    parts = {d: token_windows(tokenizer, getattr(corpus()[d], split), third, count, seed + k)
             for k, d in enumerate(DOMAINS)}
    rng = random.Random(seed)
    out = []
    for i in range(count):
        order = list(DOMAINS)
        rng.shuffle(order)
        window = [t for d in order for t in parts[d][i]]
        out.append(window[:seq_len])
    return out


# -- a user's text file ----------------------------------------------------------------

HOLDOUT_EVERY = 5


def file_documents(path: Path) -> tuple[str, ...]:
    """A local text file as documents: a .jsonl file's `text` field per line, or a .txt
    file's paragraphs (separated by blank lines)."""
    text = Path(path).expanduser().read_text(encoding="utf-8")
    if Path(path).suffix == ".jsonl":
        return tuple(json.loads(line)["text"] for line in text.splitlines() if line.strip())
    return tuple(t.strip() for t in text.split("\n\n") if t.strip())


def holdout_split(documents: tuple[str, ...]) -> Split:
    """Every fifth document (the 5th, 10th, ...) held out for evaluation, the rest for
    calibration: deterministic, disjoint, and spread over the whole file rather than its
    end, so a file sorted by date or topic is represented in both. With fewer than five
    documents the last one is held out."""
    if len(documents) < 2:
        raise ValueError("holding out part of the calibration file needs at least two "
                         "documents (paragraphs of a .txt separated by blank lines, or "
                         ".jsonl lines)")
    held = set(range(HOLDOUT_EVERY - 1, len(documents), HOLDOUT_EVERY)) or {len(documents) - 1}
    return Split(train=tuple(d for i, d in enumerate(documents) if i not in held),
                 eval=tuple(documents[i] for i in sorted(held)))


# -- generic out-of-distribution text --------------------------------------------------

OUT_OF_DISTRIBUTION = ("Python's licence (LICENSE.txt) and language reference "
                       "(pydoc_data.topics): legal and reference prose, in no corpus split")


@lru_cache(maxsize=None)
def out_of_distribution() -> dict[str, tuple[str, ...]]:
    """Generic held-out text from another distribution than the three domains, present in
    every CPython installation: the licence (legal English) and the language reference's
    topics. Neither feeds any split above (the python domain reads package sources, the
    prose domain module docstrings; tests/test_isq.py checks no long line is shared)."""
    from pydoc_data.topics import topics

    licence = _stdlib() / "LICENSE.txt"
    return {"licence": (licence.read_text(encoding="utf-8", errors="replace"),)
            if licence.is_file() else (),
            "reference": tuple(topics[k] for k in sorted(topics))}


def out_of_distribution_windows(tokenizer, seq_len: int, count: int) -> list[list[int]]:
    """`count` windows: up to a quarter from the licence, the rest from the reference."""
    ood = out_of_distribution()
    legal = available_windows(tokenizer, ood["licence"], seq_len, count // 4, seed=3)
    return legal + token_windows(tokenizer, ood["reference"], seq_len, count - len(legal), seed=3)
