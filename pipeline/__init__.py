"""Audio dataset -> EnCodec RVQ tokens -> Parquet shards. See README.md for the words used here."""

__version__ = "0.1.0"
