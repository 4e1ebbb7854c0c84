"""popcount64: one implementation for every Hamming distance in the code base; NumPy 2's
``bitwise_count`` where it exists, a SWAR bit sum on NumPy 1.26 (which lacks it)."""

import numpy as np
import pytest

from dedup.compute.search.hamming import popcount64


def _values() -> np.ndarray:
    rng = np.random.default_rng(0)
    edge = np.array([0, 1, 2**63, 2**64 - 1, 0x5555555555555555, 0xAAAAAAAAAAAAAAAA, 0x0101010101010101], np.uint64)
    return np.concatenate([edge, rng.integers(0, 2**64 - 1, 2000, dtype=np.uint64, endpoint=True)])


def _reference(v: np.ndarray) -> np.ndarray:
    return np.array([bin(int(a)).count("1") for a in v.ravel()], np.int64).reshape(v.shape)


@pytest.mark.parametrize("numpy1", [False, True], ids=["bitwise_count", "numpy-1.26"])
def test_popcount64_matches_bin_count(numpy1, monkeypatch):
    if numpy1 and hasattr(np, "bitwise_count"):
        monkeypatch.delattr(np, "bitwise_count")  # the NumPy 1.26 path
    v = _values()
    got = popcount64(v)
    assert got.dtype == np.int64 and np.array_equal(got, _reference(v))
    m = v[:1800].reshape(60, 30)[:, ::3]  # 2-d, not contiguous
    assert np.array_equal(popcount64(m), _reference(m))
    assert np.array_equal(popcount64(v.view(np.int64)), _reference(v))  # int64: its two's-complement bits
    s = popcount64(np.uint64(2**64 - 1))
    assert s.shape == () and int(s) == 64
    assert int(popcount64(7)) == 3
