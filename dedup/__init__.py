"""dedup: remove duplicate and near-duplicate images from WebDataset shards."""

__version__ = "0.1.0"
