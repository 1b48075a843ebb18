"""Instance segmentation: boxes plus a pixel mask per object (trainer, validator, predictor)."""
