"""linvision.sample: the high-resolution sampling job."""
