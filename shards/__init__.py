"""WebDataset shards, the per-sample index, storage (local and s3://) and ingest."""
from .dataset import Dataset, DatasetError, Sample
from .storage import StorageError

__all__ = ["Dataset", "DatasetError", "Sample", "StorageError"]
