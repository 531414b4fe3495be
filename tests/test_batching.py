"""Token-budget batching: grouping, the budget controller, and out-of-memory splits with the real model."""

import numpy as np
import pytest

from pipelines.embedding import Embedder
from pipelines.embedding.batching import TokenBudget, is_out_of_memory, max_tokens, plan_batches
from tests.conftest import scifact_docs

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def test_groups_hold_every_row_once_within_the_budget():
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(5, 256, size=500)] + [900]  # one row over the budget
    groups = plan_batches(lengths, budget=2048)
    flat = sorted(i for group in groups for i in group)
    assert flat == list(range(len(lengths)))
    for group in groups:
        padded = len(group) * max(lengths[i] for i in group)
        assert padded <= 2048 or len(group) == 1
    # Sorted by length, so padding stays small.
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert padded / sum(lengths) < 1.1


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_grows_while_throughput_improves_then_backs_off():
    clock = FakeClock()
    budget = TokenBudget(initial=1000, minimum=100, maximum=100_000, window_tokens=1000, clock=clock)
    rates = {1000: 100.0, 1500: 150.0, 2250: 200.0, 3375: 120.0}  # tokens/s at each budget
    for _ in range(6):
        rate = rates.get(budget.value, 50.0)
        budget.observe(tokens=budget.value, padded=budget.value, seconds=budget.value / rate)
    reasons = [e["reason"] for e in budget.events]
    assert reasons[:4] == [
        "start",
        "grow: throughput improved",
        "grow: throughput improved",
        "grow: throughput improved",
    ]
    assert "back off: throughput fell" in reasons
    assert budget.value == 2250  # the best budget measured
    for _ in range(3):  # and it stays there: the ceiling is the best budget
        budget.observe(tokens=budget.value, padded=budget.value, seconds=budget.value / 200.0)
    assert budget.value == 2250


def test_the_budget_ceiling_follows_the_device_unless_configured():
    """A CPU pass is no faster past ~16k padded tokens, only bigger: its budget stops there."""
    assert max_tokens(None, device="cpu", initial=8192) == 16_384
    assert max_tokens(None, device="cuda", initial=8192) == 262_144
    assert max_tokens(None, device="cpu", initial=32_768) == 32_768  # a larger start is kept
    assert max_tokens(4096, device="cpu", initial=1024) == 4096
    cpu = Embedder(model=MODEL, device="cpu", dtype="fp32")
    assert cpu.budget.maximum == 16_384
    clock = FakeClock()
    budget = TokenBudget(
        initial=8192, minimum=256, maximum=cpu.budget.maximum, window_tokens=1000, clock=clock
    )
    for rate in (100.0, 200.0, 300.0, 400.0, 500.0):  # throughput keeps rising: growth stops at the ceiling
        budget.observe(tokens=budget.value, padded=budget.value, seconds=budget.value / rate)
    assert budget.value == 16_384


def test_budget_shrinks_under_memory_pressure():
    free = [0.5]
    budget = TokenBudget(
        initial=8000, minimum=500, maximum=64_000, window_tokens=100, free_memory=lambda: free[0]
    )
    budget.observe(tokens=8000, padded=8000, seconds=1.0)
    assert budget.value > 8000
    free[0] = 0.05
    before = budget.value
    budget.observe(tokens=100, padded=100, seconds=1.0)
    assert budget.value == before // 2
    assert budget.events[-1]["reason"] == "shrink: memory pressure"


def test_fixed_budget_does_not_adapt():
    budget = TokenBudget(initial=4096, minimum=256, maximum=65_536, adapt=False, window_tokens=10)
    for _ in range(5):
        budget.observe(tokens=4096, padded=4096, seconds=0.1)
    assert budget.value == 4096


def test_out_of_memory_errors_are_recognized():
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(ValueError("bad input"))


@pytest.fixture(scope="module")
def embedder():
    return Embedder(model=MODEL, device="cpu", dtype="fp32", batch_tokens=100_000, max_batch_tokens=100_000)


def test_injected_oom_splits_the_batch_and_embeds_every_row_once(embedder):
    docs = scifact_docs(40)
    texts = [f"{d['title']} {d['text']}" for d in docs]
    lengths = [
        len(embedder.backend.model.tokenizer(t, truncation=True, max_length=256)["input_ids"]) for t in texts
    ]
    reference = embedder.encode(texts)

    real = embedder.backend.encode
    embedded: list[str] = []
    calls = {"failed": 0}

    def tight_memory(batch: list[str]) -> np.ndarray:
        if len(batch) > 5:  # stands in for a device with room for 5 rows
            calls["failed"] += 1
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.50 GiB (injected)")
        embedded.extend(batch)
        return real(batch)

    embedder.backend.encode = tight_memory
    try:
        vectors, stats = embedder.embed(texts, lengths)
    finally:
        embedder.backend.encode = real
    assert calls["failed"] > 0 and stats["oom_splits"] == calls["failed"]
    assert sorted(embedded) == sorted(texts)  # every row embedded exactly once
    np.testing.assert_allclose(vectors, reference, atol=1e-5)  # in its own place
    shrinks = [e for e in embedder.budget.events if e["reason"] == "shrink: out of memory"]
    assert shrinks and embedder.budget.value < 100_000
    print(f"\n{calls['failed']} OOM splits, {stats['passes']} passes, budget {embedder.budget.value}")


def test_a_single_row_that_does_not_fit_is_an_error(embedder):
    real = embedder.backend.encode

    def no_memory(batch: list[str]) -> np.ndarray:
        raise MemoryError("injected")

    embedder.backend.encode = no_memory
    try:
        with pytest.raises(MemoryError):
            embedder.embed(["one text"], [4])
    finally:
        embedder.backend.encode = real


def test_cublas_alloc_failures_count_as_out_of_memory():
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))


def test_an_oom_is_freed_before_the_split_runs(embedder):
    """The failed pass's frames hold its tensors; the split must not run while they are alive."""
    import weakref

    class Activation:  # stands in for a tensor of the failed pass
        pass

    alive: list[weakref.ref] = []
    seen_alive_at_split: list[bool] = []
    real = embedder.backend.encode

    def leaky(batch: list[str]) -> np.ndarray:
        seen_alive_at_split.append(any(ref() is not None for ref in alive))
        if len(batch) > 2:
            activation = Activation()  # referenced from this frame, so from the traceback
            alive.append(weakref.ref(activation))
            raise RuntimeError("CUDA out of memory (injected)")
        return real(batch)

    embedder.backend.encode = leaky
    try:
        vectors, stats = embedder.embed(["a b c"] * 8, [5] * 8)
    finally:
        embedder.backend.encode = real
    assert stats["oom_splits"] >= 1 and vectors.shape == (8, 384)
    assert alive and not any(seen_alive_at_split), "a split ran while the failed pass was still held"


def test_memory_held_by_others_does_not_ratchet_the_budget_down():
    """Free memory held at 10% by something else: one shrink, then the budget holds (it fell from
    65,536 to 256 tokens in 8 windows before), with adapt on or off."""
    for adapt in (True, False):
        budget = TokenBudget(
            initial=65_536, minimum=256, maximum=262_144, adapt=adapt, window_tokens=1000,
            free_memory=lambda: 0.10,
        )  # fmt: skip
        for _ in range(20):
            budget.observe(tokens=budget.value, padded=budget.value, seconds=0.1)
        assert budget.value == 32_768, (adapt, budget.value)
        falling = iter([0.10, 0.08, 0.06, 0.04])  # but memory that keeps running out: shrink again
        budget.free_memory = lambda it=falling: next(it, 0.04)
        for _ in range(4):
            budget.observe(tokens=budget.value, padded=budget.value, seconds=0.1)
        assert budget.value < 32_768


def test_cuda_free_memory_counts_the_cache_as_free(monkeypatch):
    """torch keeps freed blocks reserved; mem_get_info counts them as taken, the budget must not."""
    import torch

    from pipelines.embedding import batching

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (1 * gib, 10 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 6 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 2 * gib)
    assert batching.cuda_free_fraction() == pytest.approx(0.5)  # 1 free + (6 - 2) cached, of 10


def test_budget_sized_from_measured_bytes_per_token():
    budget = TokenBudget(initial=8192, minimum=256, maximum=1_048_576)
    budget.size_from_memory(bytes_per_token=40_000, free_bytes=40 * 2**30)  # half of 40 GiB at 40 kB/token
    assert budget.value == budget.ceiling == int(0.5 * 40 * 2**30 / 40_000)
    budget.size_from_memory(bytes_per_token=40_000, free_bytes=10**12)
    assert budget.value == 1_048_576  # never above the configured maximum
    assert "sized from memory" in budget.events[-1]["reason"]


def test_the_next_pass_is_prepared_in_a_thread_while_one_runs():
    """With token ids from the chunker, pass i+1 is padded in a thread while pass i runs; the
    vectors are those of the text path, and an out-of-memory pass still splits."""
    import threading

    from pipelines import models

    small = Embedder(model=MODEL, device="cpu", dtype="fp32", batch_tokens=2048, min_batch_tokens=64,
                     max_batch_tokens=2048, adapt_batch=False)  # fmt: skip
    docs = scifact_docs(30)
    texts = [f"{d['title']} {d['text']}" for d in docs]
    ids = [e.ids for e in models.load_embedding_tokenizer(MODEL).encode_batch(texts)]
    lengths = [len(i) for i in ids]
    reference = small.encode(texts)

    threads, real_prepare, real_run = set(), small.backend.prepare_ids, small.backend.run_prepared
    failures = {"n": 0}

    def prepare(batch):
        threads.add(threading.current_thread().name)
        return real_prepare(batch)

    def run(prepared):
        if prepared[0].shape[0] > 3 and failures["n"] < 2:  # up to two injected OOMs
            failures["n"] += 1
            raise RuntimeError("CUDA out of memory (injected)")
        return real_run(prepared)

    small.backend.prepare_ids, small.backend.run_prepared = prepare, run
    vectors, stats = small.embed(texts, lengths, ids)
    assert stats["passes"] > 5 and stats["oom_splits"] == failures["n"] >= 1 and stats["busy_s"] > 0
    assert any(name.startswith("embed-prepare") for name in threads)  # padded off the main thread
    np.testing.assert_allclose(vectors, reference, atol=1e-5)


def test_nothing_to_embed_loads_no_model():
    lazy = Embedder(model=MODEL, device="cpu", dtype="fp32")
    vectors, stats = lazy.embed([], [], [])
    assert vectors.shape == (0, 384) and stats["passes"] == 0
    assert lazy._backend is None  # a batch of cache hits or unchanged documents needs no model
