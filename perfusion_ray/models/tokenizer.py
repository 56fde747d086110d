"""The real OpenAI CLIP BPE tokenizer (49,408 tokens), built from the vocabulary file that the
open-clip-torch wheel ships (installed --no-deps; open_clip itself is never imported: it needs
torchvision). No hub access.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from perfusion_ray.errors import PerfusionError

VOCAB_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # the merges CLIP uses (lines 1..48894 of the file)
MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, characters)))


def _vocabulary_source() -> Path:
    try:
        path = Path(metadata.distribution("open_clip_torch").locate_file(VOCAB_FILE))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise PerfusionError("the CLIP BPE vocabulary is missing (it ships inside open-clip-torch)",
                             hint="pip install --no-deps open-clip-torch==3.3.0 (./run does this)")
    return path


def write_tokenizer_files(folder: Path) -> Path:
    """Write vocab.json, merges.txt and the configs CLIPTokenizer.from_pretrained reads."""
    with gzip.open(_vocabulary_source(), "rt", encoding="utf-8") as handle:
        merges = handle.read().split("\n")[1:NUM_MERGES + 1]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": MAX_LENGTH, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer",
    }))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}))
    return folder


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "perfusion_ray" / "clip-bpe-49408"


@lru_cache(maxsize=1)
def clip_tokenizer():
    """The CLIP tokenizer (transformers CLIPTokenizer), built once into the user cache."""
    from transformers import CLIPTokenizer

    folder = _cache_dir()
    if not folder.is_dir():
        # Built beside and renamed into place, so that concurrent processes never read half a folder.
        staging = write_tokenizer_files(folder.with_name(f"{folder.name}.tmp{os.getpid()}"))
        try:
            os.rename(staging, folder)
        except OSError:  # another process got there first
            shutil.rmtree(staging, ignore_errors=True)
    return CLIPTokenizer.from_pretrained(str(folder))
