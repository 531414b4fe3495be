"""Token-budget batching: grouping, the budget controller, and out-of-memory splits with the real model."""

import numpy as np
import pytest

from pipelines.batching import TokenBudget, is_out_of_memory, plan_batches
from pipelines.embedding import Embedder
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
