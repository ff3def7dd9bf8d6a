"""Check (and optionally download) Pascal VOC07+12 for `dataset=voc0712` and the VOC presets.

    python scripts/prepare_voc.py [--root DIR] [--download] [--write-config NAME]

The root is the VOCdevkit folder holding VOC2007/ and VOC2012/ (default: $ALRUN_VOC_ROOT, else
./data/VOCdevkit). alrun reads VOC in place, so "preparing" is checking: every folder and split
file the protocol uses exists, the split sizes are the official ones (5,011 / 11,540 trainval,
4,952 test; a smaller copy is reported, not refused), and the whole copy reads with alrun's own
reader (every XML parses, every image exists and has the size its XML declares, the class names
are the configured ones, both ways). It then prints how to point alrun at the copy and, with
--write-config NAME, writes ./configs/dataset/NAME.yaml (the user config folder alrun searches).

--download fetches the official tar files from the VOC site into the root's parent first.
Problems end as one line `prepare_voc: error: <path>: <what>` and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alrun.data.voc import VOC_CLASSES, check_voc_folder, voc_union_splits  # noqa: E402
from alrun.errors import AlrunError  # noqa: E402

#: the official archives (Everingham et al., the PASCAL VOC challenge site)
ARCHIVES = (
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar",
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtest_06-Nov-2007.tar",
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
)
POOL = ("VOC2007/trainval", "VOC2012/trainval")
TEST = ("VOC2007/test",)
#: image counts of the official splits (devkit ImageSets/Main)
OFFICIAL = {"VOC2007/trainval": 5011, "VOC2012/trainval": 11540, "VOC2007/test": 4952}


class PrepareError(Exception):
    """A one-line problem with the copy."""


def default_root() -> Path:
    return Path(os.environ.get("ALRUN_VOC_ROOT", "data/VOCdevkit"))


def download(root: Path) -> None:
    """Fetch and unpack the official archives; each unpacks into VOCdevkit/ beside them."""
    target = root.parent
    target.mkdir(parents=True, exist_ok=True)
    for url in ARCHIVES:
        archive = target / url.rsplit("/", 1)[-1]
        if not archive.is_file():
            print(f"prepare_voc: downloading {url}", flush=True)
            partial = archive.with_suffix(".part")
            try:
                urllib.request.urlretrieve(url, partial)
            except OSError as err:
                raise PrepareError(
                    f"{url}: download failed ({err}); offline? copy it by hand"
                ) from None
            partial.rename(archive)
        print(f"prepare_voc: unpacking {archive.name}", flush=True)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
    if root.name != "VOCdevkit" and not root.exists():
        (target / "VOCdevkit").rename(root)


def split_sizes(root: Path) -> dict[str, int]:
    """Image ids per ``<folder>/<split>``, checking the layout first (one line per problem)."""
    sizes = {}
    for entry in (*POOL, *TEST):
        folder, split = entry.split("/")
        try:
            check_voc_folder(root / folder, split, key=str(root))
        except AlrunError as err:
            raise PrepareError(str(err)) from None
        ids = (root / folder / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        sizes[entry] = len(ids)
    return sizes


def write_config(name: str, root: Path, classes: tuple[str, ...]) -> Path:
    path = Path("configs") / "dataset" / f"{name}.yaml"
    if path.exists():
        raise PrepareError(f"{path}: exists; choose another --write-config name")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Written by scripts/prepare_voc.py: the checked VOC07+12 copy.\n"
        "defaults:\n  - voc0712@_here_\n  - _self_\n"
        f"root: {root.resolve()}\n"
        + ("" if classes == VOC_CLASSES else f"classes: [{', '.join(classes)}]\n")
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="the VOCdevkit folder")
    parser.add_argument("--download", action="store_true", help="fetch the official archives")
    parser.add_argument("--classes", nargs="+", default=list(VOC_CLASSES), help="class list")
    parser.add_argument("--write-config", metavar="NAME", help="write ./configs/dataset/NAME.yaml")
    parser.add_argument("--skip-invalid", action="store_true", help="count bad items, do not fail")
    args = parser.parse_args(argv)
    root = args.root or default_root()
    try:
        if args.download:
            download(root)
        if not root.is_dir():
            raise PrepareError(
                f"{root.resolve()}: does not exist; pass --root, set ALRUN_VOC_ROOT, or add "
                "--download"
            )
        sizes = split_sizes(root)
        for entry, count in sizes.items():
            note = (
                ""
                if count == OFFICIAL[entry]
                else f" (official: {OFFICIAL[entry]}; a partial copy)"
            )
            print(f"prepare_voc: {entry}: {count} images{note}")
        try:
            splits = voc_union_splits(
                root, POOL, TEST, tuple(args.classes), skip_invalid=args.skip_invalid
            )
        except AlrunError as err:
            raise PrepareError(str(err)) from None
        skipped = len(splits.pool.skipped) + len(splits.test.skipped)
        print(
            f"prepare_voc: ok: pool {len(splits.pool)} images / {splits.pool.num_boxes} boxes, "
            f"test {len(splits.test)} images / {splits.test.num_boxes} boxes, "
            f"{len(splits.classes)} classes" + (f", {skipped} items skipped" if skipped else "")
        )
        print(f"prepare_voc: use it with: export ALRUN_VOC_ROOT={root.resolve()}")
        if args.write_config:
            path = write_config(args.write_config, root, tuple(args.classes))
            print(f"prepare_voc: wrote {path}: alrun dataset={args.write_config}")
    except PrepareError as err:
        print(f"prepare_voc: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
