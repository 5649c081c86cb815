"""linvision.benchmarks: side-by-side speed and memory runs."""
