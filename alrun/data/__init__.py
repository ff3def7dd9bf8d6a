"""Datasets: one internal type, COCO / VOC / YOLO readers, the embedded synthetic default."""

from alrun.data.dataset import DatasetSplits, DetectionDataset, ImageRecord

__all__ = ["DatasetSplits", "DetectionDataset", "ImageRecord"]
