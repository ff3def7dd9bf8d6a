"""The docs site: generated pages (scripts/docs_pages.py) and links that must not break."""

from __future__ import annotations

import re

import yaml

from scripts import docs_pages
from tests.helpers import REPO

CONFIGS = REPO / "alrun" / "configs"


def test_strategy_table_has_every_strategy_config_with_family_needs_and_reference():
    rows = {row.name: row for row in docs_pages.strategy_rows()}
    assert set(rows) == {p.stem for p in (CONFIGS / "strategy").glob("*.yaml")}
    assert (rows["random"].family, rows["random"].needs) == ("baseline", "nothing (no prediction)")
    assert rows["entropy"].family == "uncertainty, one pass" and rows["entropy"].needs == "probs"
    assert rows["mc_entropy"].family == "uncertainty, multi-pass (mc dropout)"
    assert rows["mc_entropy"].needs == "probs; passes 10; head dropout 0.2"
    assert rows["ensemble_bald"].needs == "probs; passes 3; ensemble 3"
    assert rows["coreset"].family == "diversity"
    assert rows["coreset"].needs == "embedding; labelled embeddings"
    assert rows["coreset"].reference == "Sener & Savarese 2018"
    assert (rows["ppal"].family, rows["loss_prediction"].family) == ("hybrid", "learned")
    assert (rows["mi_aod"].family, rows["qbc"].family) == (
        "learned",
        "uncertainty, multi-pass (ensemble)",
    )
    assert rows["compas"].family == "box-level queries"  # no image selector
    assert rows["al_mdn"].reference == "Choi et al. ICCV 2021"  # the title left to Methods
    assert rows["bald"].reference == "Houlsby et al. 2011; Haussmann et al. 2020"  # docstring
    assert rows["box_in_box"].description.startswith("Vo et al. 2022: same-class box-in-box")
    assert rows["coreset"].description.startswith("Core-set: greedy k-center")  # cited apart
    page = docs_pages.strategies_page()
    assert page.count("\n| `") == len(rows)
    assert "| `loc_tightness` |" in page and "1 - \\|IoU(proposal, box)" in page  # | escaped


def test_config_groups_page_lists_every_option_with_its_header_comment():
    page = docs_pages.config_groups_page()
    for group in docs_pages.GROUPS:
        assert f"## `{group}`" in page
        for path in (CONFIGS / group).glob("*.yaml"):
            assert f"| `{path.stem}` |" in page
    assert docs_pages.header_comment(CONFIGS / "experiment" / "demo.yaml").startswith("The README")


def _local_links(markdown: str) -> list[str]:
    links = re.findall(r"\]\(([^)\s]+)\)", markdown)
    return [link.split("#")[0] for link in links if not re.match(r"[a-z]+:", link)]


def test_readme_links_and_the_nav_point_at_existing_pages():
    generated = {docs_pages.STRATEGIES_PAGE, docs_pages.GROUPS_PAGE, docs_pages.CAPABILITIES_PAGE}
    for link in _local_links((REPO / "README.md").read_text()):
        target = link.removeprefix("docs/")
        assert (REPO / link).exists() or target in generated, link
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text().split("\nnav:", 1)[1].join(["nav:", ""]))
    pages = re.findall(r"[\w/-]+\.md", str(nav))
    docs = {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md")}
    assert set(pages) == docs | generated  # mkdocs --strict refuses pages outside the nav
