"""Feature extractors for point clouds, images and states, chosen by config key.

    from sodp3d.encoders import build_encoder
    enc = build_encoder("dp3", {"point_cloud": (512, 3), "agent_pos": (9,)})
    feats = enc({"point_cloud": pc, "agent_pos": ap})   # (B, enc.out_dim)

The policy folds its To observed steps into the batch, calls the encoder once on
(B * To, ...) tensors and reshapes the result to (B, To * out_dim). Point xyz arrives
min-max normalised to [-1, 1]; rgb channels (when the cloud has 6) stay in [0, 1].
Images arrive as stored (uint8 values, (B, H, W, C)): the image encoder scales them.

Adding an encoder is one file and one line:
  1. ``encoders/<name>.py``: subclass ``base.Encoder``; set the class attribute ``keys``
     (the obs keys read); take ``shape_meta`` first and options as keyword arguments with
     defaults (the registry reads this signature, so an unknown option is rejected);
     call ``super().__init__(shape_meta)`` (it checks the keys are there); set
     ``self.out_dim``; ``forward(obs) -> (B, out_dim)``. Put a shape legend at the top.
     A point encoder with DP3's agent_pos branch subclasses ``base.PointCloudEncoder``
     instead and only writes its point branch (``point_features``), as dp3 and pointnet do.
  2. one line in ``ENCODERS`` below.
The tests in ``tests/test_encoders.py`` are parametrised over ``ENCODERS`` and pick it up.
"""

from __future__ import annotations

import inspect
from typing import Any

from sodp3d.errors import UserError

from .base import Encoder, ShapeMeta, missing_keys, missing_keys_message, normalise_shape_meta
from .dp3 import DP3Encoder
from .image import ImageEncoder
from .pointnet import PointNetEncoder
from .state import StateEncoder

ENCODERS: dict[str, type[Encoder]] = {
    "dp3": DP3Encoder,
    "image": ImageEncoder,
    "pointnet": PointNetEncoder,
    "state": StateEncoder,
}


def encoder_names() -> list[str]:
    return list(ENCODERS)


def encoder_options(name: str) -> dict[str, Any]:
    """The options an encoder takes, with their defaults."""
    params = inspect.signature(_lookup(name).__init__).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.name not in ("self", "shape_meta") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _lookup(name: str) -> type[Encoder]:
    try:
        return ENCODERS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown encoder {name!r}; valid: {', '.join(encoder_names())}") from None


def build_encoder(name: str, shape_meta: ShapeMeta, **kwargs: Any) -> Encoder:
    """The encoder registered as ``name`` for ``shape_meta`` (obs key -> per-step shape).

    Raises UserError for an unknown name, an obs key the encoder reads that shape_meta
    lacks, or an option the encoder does not take.
    """
    cls = _lookup(name)
    shape_meta = normalise_shape_meta(shape_meta)
    missing = missing_keys(cls.keys, shape_meta)
    if missing:
        raise UserError(missing_keys_message(name, missing, shape_meta))
    options = encoder_options(name)
    unknown = [k for k in kwargs if k not in options]
    if unknown:
        bad = ", ".join(repr(k) for k in unknown)
        raise UserError(
            f"encoder {name!r} has no option{'s' if len(unknown) > 1 else ''} {bad}; "
            f"valid: {', '.join(options) or 'none'}"
        )
    return cls(shape_meta, **kwargs)


__all__ = [
    "ENCODERS",
    "DP3Encoder",
    "Encoder",
    "ImageEncoder",
    "PointNetEncoder",
    "StateEncoder",
    "build_encoder",
    "encoder_names",
    "encoder_options",
]
