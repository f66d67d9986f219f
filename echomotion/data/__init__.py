"""HuMoVe data: shard schema, HuMoVe-mini, preparation tools, and the training loader (transport, dataset, batch, loader)."""
