"""``natgrad analyze`` on a trained model: the paper's gradient analyses, with the model's provenance."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from natgrad.analysis.analyze import AnalysisSettings, analyze
from natgrad.build import LoadedModel
from natgrad.engine.distributed import Context, batch_source


def analyze_model(loaded: LoadedModel, ds: Dataset, settings: AnalysisSettings, ctx: Context | None = None
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The analyses of ``loaded`` on ``ds`` (batch ``b`` seeded by ``settings.seed + b``); returns ``(summary,
    arrays)`` with the model, method, architecture, dataset and weights digest in the summary.

    ``ctx``: under torchrun the context of :func:`~natgrad.engine.distributed.setup`; the images are then
    sharded across the processes as ``natgrad eval`` shards them (global batch ``b`` on rank ``b % world``),
    every process must call this and every process gets the one-process result. ``None`` (the default): this
    process alone analyses every image, also under torchrun (e.g. on rank 0 only)."""
    ctx = ctx or Context(0, 1, next(loaded.model.parameters()).device)
    batches = batch_source(ds, settings.seed, ctx)
    summary, arrays = analyze(loaded.model, batches, len(ds), settings, ctx)  # type: ignore[arg-type]
    cfg = loaded.cfg
    summary = {"model": loaded.name, "method": cfg.method, "architecture": cfg.model.name, "dataset": cfg.data.name,
               **summary, "weights": str(loaded.weights), "weights_sha256": loaded.sha256}
    return summary, arrays
