"""Object detection: trainer and validator."""
