"""ConMH (AAAI 2023): the masked, contrastive video autoencoder of conmh.model, trained by conmh.train.

The pipeline trains it with ``conmh train``, started as its own process
(under torchrun or srun when data-parallel, on free GPUs, resumable:
conmh.pipeline.steps.fit); :func:`fit` is the same training in this process.
"""

from __future__ import annotations

from pathlib import Path

from ..codes import Codes
from ..presets import PAPER_PRESET

DISPLAY = "ConMH"
USES_GPU = True


def fit(
    dataset: str,
    data_dir: str | Path,
    bits: int,
    model_file: str | Path,
    preset: str = PAPER_PRESET,
    device: str = "auto",
    **recipe_changes,
) -> None:
    """Train with the paper's recipe for ``dataset`` (conmh.recipes), changed by ``recipe_changes``
    (e.g. ``epochs=3``); the model is written to ``model_file``, which must be named model.pt (its folder
    also gets the epoch checkpoint and the training log)."""
    from ..errors import ConfigError
    from ..features import open_split
    from ..model import ModelConfig
    from ..recipes import get_recipe
    from ..train import train

    model_file = Path(model_file)
    if model_file.name != "model.pt":
        raise ConfigError(f"{model_file}: ConMH's training writes model.pt in its folder; name the model file so")
    with open_split(dataset, data_dir, "train") as feats:
        cfg = ModelConfig.from_preset(preset, feature_dim=feats.dim, frames=feats.frames, nbits=bits)
        train(
            feats,
            cfg,
            get_recipe(dataset).replace(**recipe_changes),
            model_file.parent,
            device=device,
            progress=False,
            meta={"dataset": dataset, "preset": preset},
        )


def encode(
    model_file: str | Path,
    dataset: str,
    data_dir: str | Path,
    bits: int,
    preset: str = PAPER_PRESET,
    device: str = "auto",
) -> Codes:
    """Codes from a checkpoint of ``conmh train`` or a released one (``bits`` and ``preset`` give the
    architecture that released files do not record)."""
    from ..encode import encode_dataset

    return encode_dataset(model_file, dataset, data_dir, bits=bits, preset=preset, device=device)
