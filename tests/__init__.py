"""Tests; a package so that tests/unit, tests/distributed and tests/ops can share helpers (tests.s3_server, tests.tiny_shards, tests.distributed.launch)."""
