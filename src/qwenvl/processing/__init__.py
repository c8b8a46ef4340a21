"""CPU-only media preprocessing: image/video loading (media.py) and pixel pipelines (image.py)."""
