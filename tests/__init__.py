"""Tests; a package so that tests/unit and tests/dist can share helpers (tests.s3_server, tests.tiny_shards, tests.dist.launch)."""
