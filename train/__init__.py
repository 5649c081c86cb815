"""linvision.train: the training jobs (classification, distillation)."""
