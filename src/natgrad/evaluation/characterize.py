"""``natgrad analyze`` on a trained model: the paper's gradient analyses, with the model's provenance."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from natgrad.analysis.analyze import AnalysisSettings, analyze
from natgrad.build import LoadedModel
from natgrad.engine.distributed import Context, batch_source


def analyze_model(loaded: LoadedModel, ds: Dataset, settings: AnalysisSettings
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The analyses of ``loaded`` on ``ds`` in this process (batch ``b`` seeded by ``settings.seed + b``);
    returns ``(summary, arrays)`` with the model, method, architecture, dataset and weights digest in the summary."""
    device = next(loaded.model.parameters()).device
    batches = batch_source(ds, settings.seed, Context(0, 1, device))
    summary, arrays = analyze(loaded.model, batches, len(ds), settings)  # type: ignore[arg-type]
    cfg = loaded.cfg
    summary = {"model": loaded.name, "method": cfg.method, "architecture": cfg.model.name, "dataset": cfg.data.name,
               **summary, "weights": str(loaded.weights), "weights_sha256": loaded.sha256}
    return summary, arrays
