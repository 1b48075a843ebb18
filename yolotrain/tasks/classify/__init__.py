"""Image classification: trainer, validator, predictor and the class-folder dataset."""
