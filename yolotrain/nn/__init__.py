"""Detector building blocks, anchor helpers and the yaml-built DetectionModel."""

from yolotrain.nn.anchors import bbox2dist, dist2bbox, make_anchors
from yolotrain.nn.model import DetectionModel, load_model_yaml, parse_model
from yolotrain.nn.modules import C2f, C3, C3k, C3k2, DFL, SPPF, Bottleneck, Concat, Conv, Detect

__all__ = [
    "Bottleneck",
    "C2f",
    "C3",
    "C3k",
    "C3k2",
    "Concat",
    "Conv",
    "DFL",
    "Detect",
    "DetectionModel",
    "SPPF",
    "bbox2dist",
    "dist2bbox",
    "load_model_yaml",
    "make_anchors",
    "parse_model",
]
