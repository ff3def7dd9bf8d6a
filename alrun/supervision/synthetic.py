"""Synthetic pre-training: train the detector on the embedded synthetic generator first, then run
the AL loop on the real pool from that checkpoint (``supervision=synthetic_pretrain``).

The pre-trained weights are computed once and cached under ``$ALRUN_CACHE/pretrain/<key>.pt``,
the key hashing everything that determines them (the detector builder and its arguments, the
synthetic data and the pre-training schedule), so every seed and strategy of a sweep shares one
pre-training. Whenever a round starts from scratch (round 0, or every round with
``trainer.init=scratch``) the detector is reset and every pre-trained tensor whose name and
shape fit is loaded: with another number of classes that is all but the class logits layer.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from alrun.data.synthetic import CLASSES, DOMAINS, default_cache_dir, synthetic_dataset
from alrun.detectors.base import REBUILD, Detector, Progress, Rebuild, TrainSchedule
from alrun.engine import (
    NO_STRATEGY_TRAINING,
    BatchSource,
    StrategyTraining,
    starts_from_scratch,
    train,
    train_with_strategy,
)
from alrun.errors import AlrunError
from alrun.io import atomic_write_bytes, write_json
from alrun.params import NonNegativeInt, PositiveFloat, PositiveInt, Range
from alrun.pool import LabelPool
from alrun.supervision.base import BaseRegime

log = logging.getLogger("alrun")

_VERSION = 1  # bump when pre-training changes, so cached checkpoints are recomputed


def transfer_matching(
    target: Mapping[str, Tensor], pretrained: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """``target`` with every tensor of ``pretrained`` that has the same name and shape;
    returns (merged state, loaded names, names kept from ``target``)."""
    merged, loaded, kept = dict(target), [], []
    for key, value in target.items():
        source = pretrained.get(key)
        if source is not None and tuple(source.shape) == tuple(value.shape):
            merged[key] = source.to(value.dtype)
            loaded.append(key)
        else:
            kept.append(key)
    return merged, loaded, kept


def _load_cached(path: Path, key: Mapping[str, Any]) -> tuple[dict | None, str | None]:
    """The cached state when the file is the one recorded for ``key`` (the sidecar JSON holds
    the key and the file's sha256), else ``(None, why)``: sweep jobs share the cache, so a
    truncated, foreign or half-replaced file must be rebuilt, never reused nor a crash."""
    try:
        data = path.read_bytes()
        sidecar = json.loads(path.with_suffix(".json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{type(err).__name__}: {err}"
    if not isinstance(sidecar, dict) or "sha256" not in sidecar:
        return None, "no digest recorded beside it"
    recorded = {k: v for k, v in sidecar.items() if k != "sha256"}
    if recorded != json.loads(json.dumps(key)):
        return None, "its recorded key is another configuration's"
    if hashlib.sha256(data).hexdigest() != sidecar["sha256"]:
        return None, "its content does not match the digest recorded beside it"
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is rebuilt
        return None, f"{type(err).__name__}: {err}"
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        return None, "it holds no state_dict"
    return state, None


def _store(path: Path, key: Mapping[str, Any], state: Mapping[str, Tensor]) -> None:
    """Checkpoint, then its sidecar (key + sha256), each written atomically: a reader between
    the two sees a digest mismatch and rebuilds, never a wrong pairing it trusts."""
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    write_json(path.with_suffix(".json"), {**key, "sha256": hashlib.sha256(data).hexdigest()})


class SyntheticPretrain(BaseRegime):
    """Full box supervision on the real pool, from a synthetic pre-training checkpoint."""

    label_kinds = ("box",)
    requires = frozenset({REBUILD})  # the same model built again for the synthetic classes

    def __init__(
        self,
        num_images: PositiveInt = 400,
        image_size: Annotated[int, Range(32, 1024)] = 128,
        domain: Literal[DOMAINS] = "source",
        data_seed: NonNegativeInt = 1,
        iterations: PositiveInt = 800,
        lr: PositiveFloat = 0.01,
        batch_size: PositiveInt = 8,
        warmup_iters: NonNegativeInt = 50,
        seed: NonNegativeInt = 0,
        cache_dir: str | None = None,
    ):
        for key, value in (
            ("num_images", num_images),
            ("iterations", iterations),
            ("batch_size", batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise AlrunError(f"supervision.{key}: expected a positive integer, got {value!r}")
        if domain not in DOMAINS:
            raise AlrunError(f"supervision.domain: expected one of {DOMAINS}, got {domain!r}")
        self.data = {
            "num_images": num_images,
            "image_size": image_size,
            "domain": domain,
            "data_seed": data_seed,
        }
        self.schedule = TrainSchedule(
            iterations=iterations,
            first_iterations=iterations,
            batch_size=batch_size,
            lr=lr,
            warmup_iters=min(warmup_iters, iterations - 1),
            init="scratch",
        )
        self.seed = seed
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._pretrained: dict[str, Tensor] | None = None
        self._cache_hit = False

    def cache_key(self, detector: Rebuild) -> dict[str, Any]:
        """Everything the pre-trained weights depend on (hashed into the cache file name)."""
        return {
            "version": _VERSION,
            "detector": detector.build_description(),
            "classes": list(CLASSES),
            "data": self.data,
            "schedule": {
                k: getattr(self.schedule, k)
                for k in (
                    "iterations",
                    "batch_size",
                    "lr",
                    "momentum",
                    "weight_decay",
                    "grad_clip",
                    "warmup_iters",
                    "min_lr_ratio",
                    "hflip",
                )
            },  # fmt: skip
            "seed": self.seed,
            "torch": torch.__version__.split("+")[0],
        }

    def checkpoint_path(self, detector: Rebuild) -> Path:
        blob = json.dumps(self.cache_key(detector), sort_keys=True)
        key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return (self.cache_dir or default_cache_dir()) / "pretrain" / f"{key}.pt"

    def pretrained_state(self, detector: Detector) -> dict[str, Tensor]:
        """The cached pre-trained weights, computed (and cached) on first use."""
        if self._pretrained is not None:
            return self._pretrained
        if REBUILD not in detector.capabilities:
            raise AlrunError(
                "supervision=synthetic_pretrain: needs a detector that can build the same model "
                f"for the synthetic classes (rebuild), got {type(detector).__name__}"
            )
        path = self.checkpoint_path(detector)
        key = self.cache_key(detector)
        state, unusable = _load_cached(path, key) if path.is_file() else (None, None)
        if unusable:
            log.warning(
                "synthetic_pretrain: the cached pre-training %s is unusable (%s); rebuilding it",
                path,
                unusable,
            )
        self._cache_hit = state is not None
        if state is None:
            state = self._pretrain(detector)
            _store(path, key, state)
        self._pretrained = state
        return state

    def _pretrain(self, detector: Rebuild) -> dict[str, Tensor]:
        data = synthetic_dataset(
            self.data["num_images"],
            self.data["image_size"],
            self.data["domain"],
            self.data["data_seed"],
            "pretrain",
            self.cache_dir,
        )
        model = detector.rebuilt(len(CLASSES))
        model.reset(self.seed)
        log.info(
            "synthetic_pretrain: pre-training on %d synthetic images for %d iterations",
            len(data),
            self.schedule.iterations,
        )
        train(model, [BatchSource("synthetic", data)], self.schedule, self.seed, True)
        return model.state_dict()

    def train(
        self,
        detector: Detector,
        pool: LabelPool,
        schedule: TrainSchedule,
        seed: int,
        round_index: int,
        progress: Progress | None = None,
        strategy: StrategyTraining = NO_STRATEGY_TRAINING,
    ) -> dict[str, float]:
        from_scratch = starts_from_scratch(schedule, round_index)
        info: dict[str, float] = {}
        if from_scratch:
            detector.reset(seed)
            pretrained = self.pretrained_state(detector)
            merged, loaded, kept = transfer_matching(detector.state_dict(), pretrained)
            detector.load_state_dict(merged)
            info = {
                "pretrain/loaded_tensors": float(len(loaded)),
                "pretrain/kept_tensors": float(len(kept)),
                "pretrain/cache_hit": float(self._cache_hit),
            }
        source = BatchSource("labelled", pool.training_set())
        stats = train_with_strategy(
            detector, [source], schedule, seed, round_index, progress=progress, strategy=strategy
        )
        return {**stats, **info}
