"""Seam example: a selector that uses pool *and* labelled-set embeddings from the context.

Farthest-first traversal (the greedy k-center of Sener & Savarese) in image-embedding space,
started from the labelled set. It plugs in through config alone; the loop hands it everything.
"""

from __future__ import annotations

import json

import torch

from alrun.acquisition.context import AcquisitionContext
from alrun.acquisition.select import fill_budget
from alrun.loop import run_experiment
from alrun.types import Needs
from tests.helpers import compose_config


class FarthestFirst:
    needs = Needs(detections=False, embedding=True, labelled_embeddings=True)
    calls: list[AcquisitionContext] = []

    def __call__(self, scores, context: AcquisitionContext) -> list[str]:
        FarthestFirst.calls.append(context)
        pool = context.preds.embeddings
        nearest = torch.cdist(pool, context.labelled_embeddings).min(dim=1).values
        order = []
        for _ in range(len(pool)):
            pick = int(nearest.argmax())
            order.append(context.preds.image_ids[pick])
            nearest = torch.minimum(nearest, torch.cdist(pool, pool[pick : pick + 1])[:, 0])
            nearest[pick] = -1.0
        return fill_budget(order, context.budget, context.cost_of, context.fill)

    def describe(self):
        return {"selector": "farthest_first"}


def test_farthest_first_runs_one_round_through_the_loop(tmp_path):
    target = f"{__name__}.FarthestFirst"
    cfg = compose_config(
        [
            "experiment=smoke",
            "quiet=true",
            "budget.rounds=1",
            "strategy=random",
            f"strategy.selector._target_={target}",
        ]
    )
    run_experiment(cfg, tmp_path)
    (context,) = FarthestFirst.calls
    assert context.labelled_embeddings.shape[0] == len(context.labelled_ids) == 10
    assert context.preds.embeddings.shape[0] == len(context.pool_ids) == 50
    sel = json.loads((tmp_path / "round_00" / "selection.json").read_text())
    assert sel["selector"] == "farthest_first" and len(sel["selected"]) == 10
    # the first pick is the pool image farthest from every labelled image
    pool, labelled = context.preds.embeddings, context.labelled_embeddings
    first = context.preds.image_ids[int(torch.cdist(pool, labelled).min(dim=1).values.argmax())]
    assert sel["selected"][0]["image_id"] == first
