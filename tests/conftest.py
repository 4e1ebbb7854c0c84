import os

import pytest

# Never let a test reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory):
    """Small shards built from real photos with planted duplicates, shared by tests."""
    from dedup.testing.synth import make_shards

    d = tmp_path_factory.mktemp("synth")
    truth = make_shards(d / "shards")
    return d / "shards", truth
