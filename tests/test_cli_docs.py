"""Errors and --help point to pages of the manual that exist (alrun/cli.py, docs/)."""

from __future__ import annotations

import re

import pytest

from alrun.cli import DOCS_PAGES, docs_page
from scripts.docs_pages import GROUPS_PAGE, STRATEGIES_PAGE
from tests.helpers import REPO


def _exists(page: str) -> bool:
    return (REPO / page).exists() or page.removeprefix("docs/") in (GROUPS_PAGE, STRATEGIES_PAGE)


@pytest.mark.parametrize(
    ("message", "page"),
    [
        ("budget.unit: expected images|boxes|seconds, got 'imgs'", "docs/budgets.md"),
        ("strategy=ppal: needs image embeddings, which ...", "docs/strategies.md"),
        ("strategy.scorer.passes: expected an integer >= 1, got 0", "docs/strategies.md"),
        ("supervision (FullSupervision): asks the oracle for 'box' labels", "docs/supervision.md"),
        ("oracle.path: clicks.jsonl line 6: click (700, 3) is outside", "docs/supervision.md"),
        ("oracle.labels: ls.json task 3: unknown class 'Dog'", "docs/annotators.md"),
        ("oracle.cost_model.box_s: expected a number > 0", "docs/budgets.md"),
        ("dataset.root: required; set dataset.root=<path>", "docs/getting-started.md"),
        ("/data/voc/Annotations/1.xml: not well-formed XML", "docs/getting-started.md"),
        ("detector: the MMDetection backend needs mmdet", "docs/clusters.md"),
        ("detector.builder.weights_backbone: the ImageNet weights of", "docs/detectors.md"),
        ("metric.protocol: expected one of coco|voc07|voc12", "docs/reports.md"),
        ("In 'run': Could not find 'strategy/entropyy'", "docs/reference/config-groups.md"),
        ("Could not override 'trainer.lrr'. To append", "docs/reference/config-groups.md"),
        ("/runs/a: in use by another alrun process (PID 7); wait", "docs/crash-safety.md"),
        ("/runs/a/round_02/state.json: damaged (not JSON)", "docs/crash-safety.md"),
        ("trainer.lr: expected a number > 0, got -1", "docs/configuration.md"),
    ],
)  # fmt: skip
def test_each_error_points_to_the_page_that_explains_its_key(message, page):
    assert docs_page(message) == page
    assert _exists(page), page


def test_every_mapped_page_and_every_page_named_by_help_exists():
    assert all(_exists(page) for _, page in DOCS_PAGES)
    help_text = (REPO / "alrun" / "configs" / "hydra" / "help" / "alrun.yaml").read_text()
    named = re.findall(r"docs/[\w/-]+\.md", help_text)
    assert len(named) >= 10 and all(_exists(page) for page in named), named
