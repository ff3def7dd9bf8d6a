"""Seam example (docs/extending.md): a detector backend written against the protocol alone."""

import json

import torch
import torch.nn.functional as F
from omegaconf import open_dict
from torch import nn

from alrun.data.images import load_image
from alrun.detectors.base import Detector
from alrun.loop import build_experiment, run_experiment
from alrun.types import Detections
from tests.helpers import compose_config


class OneBoxDetector(nn.Module):  # nn.Module gives parameters(), state_dict(), load_state_dict()
    """One box per image: a small conv net gives class logits and the box as image fractions."""

    head_type = "softmax"  # one distribution over the classes per box
    capabilities: frozenset[str] = frozenset()  # none of the optional ones (detectors/base.py)

    def __init__(self, num_classes: int, device: str = "cpu"):
        super().__init__()
        self.num_classes, self.device = num_classes, torch.device(device)
        self.reset(0)

    def reset(self, seed: int) -> None:
        torch.manual_seed(seed)
        layers = [nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers, nn.Linear(8, self.num_classes + 4))

    def train_mode(self) -> None:
        self.train()

    def _forward(self, images):
        out = self.net(torch.stack(images))
        scale = torch.tensor([[im.shape[2], im.shape[1]] * 2 for im in images], dtype=out.dtype)
        return out[:, : self.num_classes], out[:, self.num_classes :].sigmoid(), scale

    def losses(self, images, targets):
        logits, boxes, scale = self._forward(images)
        first = torch.stack([t["boxes"][0] for t in targets]) / scale  # every image has a box
        labels = torch.stack([t["labels"][0] for t in targets])
        return {"cls": F.cross_entropy(logits, labels), "box": F.l1_loss(boxes, first)}

    @torch.no_grad()
    def predict(self, images, needs, progress=None):
        self.eval()
        logits, boxes, scale = self._forward([load_image(r) for r in images])
        probs, out = logits.softmax(1), []
        for i, r in enumerate(images):
            p = probs[i : i + 1]
            box = (boxes * scale)[i : i + 1]
            with_bg = torch.cat([p, p.new_zeros(1, 1)], 1)  # probs: C + background (never here)
            out.append(
                Detections(r.image_id, box, p.max(1).values, p.argmax(1), with_bg, class_probs=p)
            )
        return out


def test_protocol_only_backend_runs_a_round_through_the_loop(tmp_path):
    cfg = compose_config(["experiment=smoke", "quiet=true", "budget.rounds=1"])
    with open_dict(cfg):
        cfg.detector = {"_target_": f"{__name__}.OneBoxDetector"}
    assert isinstance(build_experiment(cfg).detector, Detector)
    rows = run_experiment(cfg, tmp_path)
    assert [r["images"] for r in rows] == [10, 20]
    sel = json.loads((tmp_path / "round_00/selection.json").read_text())["selected"]
    scores = [s["score"] for s in sel]  # entropy of its class probabilities, highest first
    assert len(sel) == 10 and scores == sorted(scores, reverse=True) and scores[0] > scores[-1]
    assert json.loads((tmp_path / "round_01/metrics.json").read_text())["train"]["iterations"] == 5
    weights = torch.load(tmp_path / "round_01/checkpoint.pt", weights_only=True)
    assert set(weights) == {"net.0.weight", "net.0.bias", "net.4.weight", "net.4.bias"}
