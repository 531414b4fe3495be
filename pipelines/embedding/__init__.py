"""The embedding stage: chunks in, unit vectors out.

- ``setup``: how a run embeds (precision, engine, actor pool, model files, cache writer), decided once
  by the driver; the Ray Data stage that runs the actors, and the totals of their stats.
- ``actor``: ``Embedder``, the callable class Ray Data runs on an actor pool (one per GPU, else CPU).
- ``backends``: one forward pass on torch or OpenVINO (fp32, bf16, fp16, int8), and the model exports.
- ``batching``: forward passes sized by padded tokens, and the budget that adapts to free memory.
- ``autotune``: which precision and engine embed fastest on this CPU at fp32's fidelity, cached.
- ``cache``: the db's ``_embed_cache`` table, so that an unchanged text is never embedded twice.
- ``query``: the query embedder, one backend and precision for ``embedpipe query`` and Serve alike.
"""

from pipelines.embedding.actor import Embedder, actor_options, autoscaler_gpus, embedding_dim

__all__ = ["Embedder", "actor_options", "autoscaler_gpus", "embedding_dim"]
