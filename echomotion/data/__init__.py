"""HuMoVe data: shard schema, HuMoVe-mini, streaming."""
