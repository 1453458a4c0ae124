import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from store_helpers import make_store, write_shard  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def store_factory(tmp_path):
    counter = iter(range(1000))

    def factory(**kwargs):
        return make_store(str(tmp_path / f"store{next(counter)}"), **kwargs)

    return factory


__all__ = ["make_store", "write_shard"]
