"""Pose estimation: boxes plus a fixed set of keypoints per object (trainer, validator, predictor)."""
