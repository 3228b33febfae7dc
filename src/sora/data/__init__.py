"""Data: streaming readers for JSONL/CSV/TSV/text/Parquet and length-bucketed batching."""

from sora.data.batching import collate, token_batches
from sora.data.readers import TextSource, read_records, read_texts, resolve_split

__all__ = ["TextSource", "collate", "read_records", "read_texts", "resolve_split", "token_batches"]
