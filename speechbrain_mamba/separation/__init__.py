"""Speech separation: data preparation, training and inference helpers."""
