"""The public set on the wire: which inputs a message means, and the logits a client sends back.

FedDF's clients compute logits on the round's public subset. A client that holds the public set
itself (simulation clients and client functions both load the run's public split) says so by
its fingerprint in its `query.architecture` reply; the server then sends it the subset's indices
(a few KB) instead of its images (MB per round). Clients that do not hold it get the images.
The server writes its fingerprint on the message, so a client never indexes another set.

Logits travel as float16 by default: they are clipped to the dtype's finite range before the
cast (an overflow would otherwise become inf and get the whole reply dropped), and the number
of clipped values goes back in the reply's metrics.
"""

from __future__ import annotations

import hashlib

import numpy as np
from flwr.app import Array, ArrayRecord

from flwr_kd.records import to_numpy

#: Config key of a public set's fingerprint (describe replies, FedDF's train messages).
FINGERPRINT_KEY = "public-fingerprint"
#: Reply-metrics key: how many logits were clipped to the wire dtype's finite range.
CLIPPED_KEY = "logits-clipped"

_fingerprints: dict[int, tuple[np.ndarray, str]] = {}  # id -> (array, fingerprint), a few


def fingerprint(x: np.ndarray) -> str:
    """A short hash of a public set's shape, dtype and values (cached per array object: a
    client process hashes its public set once)."""
    cached = _fingerprints.get(id(x))
    if cached is not None and cached[0] is x:
        return cached[1]
    x_c = np.ascontiguousarray(x)
    h = hashlib.sha256(f"{x_c.dtype.str}{x_c.shape}".encode())
    h.update(x_c.data)
    value = h.hexdigest()[:32]
    if len(_fingerprints) >= 4:
        _fingerprints.clear()
    _fingerprints[id(x)] = (x, value)
    return value


def encode_subset(indices: np.ndarray, n_public: int) -> ArrayRecord:
    """Sorted, distinct `indices` into a public set of `n_public` samples, in the smaller of
    two forms: int32 `indices`, or a bit `mask` over the set (1 bit per public sample)."""
    if len(indices) * 32 < n_public:
        return ArrayRecord({"indices": Array(np.asarray(indices, np.int32))})
    mask = np.zeros(n_public, bool)
    mask[indices] = True
    return ArrayRecord({"mask": Array(np.packbits(mask))})


def decode_subset(record: ArrayRecord, n_public: int) -> np.ndarray:
    """The sorted indices `encode_subset` wrote, checked against a set of `n_public` samples."""
    if "mask" in record:
        bits = to_numpy(record["mask"])
        if bits.dtype != np.uint8 or bits.shape != ((n_public + 7) // 8,):
            raise ValueError(f"public mask of shape {bits.shape} does not fit {n_public} samples")
        return np.flatnonzero(np.unpackbits(bits, count=n_public))
    indices = to_numpy(record["indices"])
    if len(indices) and (indices.min() < 0 or indices.max() >= n_public):
        raise ValueError(f"public indices out of range for {n_public} samples")
    return indices


def public_inputs(record: ArrayRecord, config, public_x: np.ndarray | None) -> np.ndarray:
    """The inputs a message's public record means: its images (`x`), or the rows of this
    client's own public set that it indexes, which must be the set the server fingerprinted."""
    if "x" in record:
        return to_numpy(record["x"])
    if public_x is None:
        raise ValueError("the server sent public indices, but this client holds no public set")
    expected = str(config.get(FINGERPRINT_KEY, ""))
    if fingerprint(public_x) != expected:
        raise ValueError(
            f"the server indexes public set '{expected}', this client holds "
            f"'{fingerprint(public_x)}'"
        )
    return public_x[decode_subset(record, len(public_x))]


def logits_for_wire(logits: np.ndarray, dtype: str) -> tuple[np.ndarray, int]:
    """`logits` cast to `dtype` ("float16" or "float32") after clipping them to its finite
    range, and the number of values clipped (NaN stays NaN: that is no overflow)."""
    limit = np.finfo(np.dtype(dtype)).max
    clipped = int(np.count_nonzero(np.abs(logits) > limit))
    return np.clip(logits, -limit, limit).astype(dtype), clipped
