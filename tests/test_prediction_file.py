"""preds.npz written shard by shard (alrun.prediction_file) is the file the whole pool's
save_predictions writes, read back by np.load."""

from __future__ import annotations

import numpy as np
import torch

from alrun.acquisition.context import PredictionBatch
from alrun.prediction_file import PredictionWriter
from alrun.round_files import save_predictions
from alrun.types import Detections


def _dets(n: int, with_probs: bool = True) -> list[Detections]:
    g = torch.Generator().manual_seed(n)
    out = []
    for i in range(n):
        k = i % 4
        probs = torch.rand(k, 3, generator=g)
        out.append(
            Detections(
                image_id=f"image-{n}-{i}",
                boxes=torch.rand(k, 4, generator=g) * 9,
                scores=torch.rand(k, generator=g),
                labels=torch.randint(0, 2, (k,), generator=g),
                probs=probs if with_probs else None,
            )
        )
    return out


def _load(path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def test_shards_written_one_by_one_equal_the_whole_batch_file(tmp_path):
    dets = _dets(11)
    scores = {d.image_id: float(i) / 3 for i, d in enumerate(dets) if i != 4}  # one unscored
    save_predictions(tmp_path / "whole.npz", PredictionBatch.from_detections(dets), scores)
    writer = PredictionWriter(tmp_path / "shards.npz")
    for start in range(0, 11, 4):
        writer.add(PredictionBatch.from_detections(dets[start : start + 4]))
    writer.finish(scores)
    whole, shards = _load(tmp_path / "whole.npz"), _load(tmp_path / "shards.npz")
    assert list(whole) == list(shards)
    for name in whole:
        assert whole[name].dtype == shards[name].dtype, name
        np.testing.assert_array_equal(whole[name], shards[name], err_msg=name)
    assert np.isnan(shards["image_scores"][4])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards.npz", "whole.npz"]


def test_a_field_some_shards_lack_is_not_saved_as_for_one_batch(tmp_path):
    dets = _dets(6) + _dets(5, with_probs=False)
    save_predictions(tmp_path / "whole.npz", PredictionBatch.from_detections(dets), {})
    writer = PredictionWriter(tmp_path / "shards.npz")
    writer.add(PredictionBatch.from_detections(dets[:6]))
    writer.add(PredictionBatch.from_detections(dets[6:]))
    writer.finish({})
    whole, shards = _load(tmp_path / "whole.npz"), _load(tmp_path / "shards.npz")
    assert "probs" not in shards and list(whole) == list(shards)
    np.testing.assert_array_equal(whole["boxes"], shards["boxes"])


def test_a_failed_step_leaves_no_shard_files(tmp_path):
    writer = PredictionWriter(tmp_path / "preds.npz")
    writer.add(PredictionBatch.from_detections(_dets(3)))
    writer.discard()
    assert list(tmp_path.iterdir()) == []
