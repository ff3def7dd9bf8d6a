"""Image decoding and the torch dataset the trainers iterate over."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from alrun.data.dataset import ImageRecord, ImageRef
from alrun.errors import DatasetError


def load_image(record: ImageRef | ImageRecord) -> Tensor:
    """(3, H, W) float32 in [0, 1], EXIF orientation applied (boxes are drawn on the displayed
    image); a clear error names the file when it cannot be decoded."""
    try:
        with Image.open(record.file) as img:
            upright = ImageOps.exif_transpose(img)
            array = np.asarray(upright.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise DatasetError(f"{record.file}: cannot read image ({err})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def target_of(record: ImageRef | ImageRecord, label_offset: int = 0) -> dict[str, Tensor]:
    """torchvision's target dict; ``label_offset`` is 1 for heads whose class 0 is background.

    An :class:`ImageRef` (an unlabelled image) has no boxes: its target is empty."""
    if isinstance(record, ImageRef):
        return {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}
    return {
        "boxes": torch.as_tensor(record.boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.as_tensor(record.labels, dtype=torch.int64) + label_offset,
    }


class TrainingImages(torch.utils.data.Dataset):
    """(image, target) pairs with an optional horizontal flip drawn from a seeded generator."""

    def __init__(self, records: Sequence[ImageRef | ImageRecord], label_offset: int, hflip: bool):
        self.records = list(records)
        self.label_offset = label_offset
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, bool]) -> tuple[Tensor, dict[str, Tensor]]:
        index, flip = item
        record = self.records[index]
        image, target = load_image(record), target_of(record, self.label_offset)
        if flip and self.hflip:
            image = image.flip(-1)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = image.shape[-1] - target["boxes"][:, [2, 0]]
            target["boxes"] = boxes
        return image, target
