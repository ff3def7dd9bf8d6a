"""Datasets: one internal type, readers for COCO / VOC / YOLO, and the embedded synthetic default."""

from alrun.data.dataset import DatasetSplits, DetectionDataset, ImageRecord

__all__ = ["DatasetSplits", "DetectionDataset", "ImageRecord"]
