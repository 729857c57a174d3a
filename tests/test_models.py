"""timm models for any dataset shape, their numpy states, and packing several into one record."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from flwr_kd.models import (
    DEFAULT_ARCHITECTURES,
    ModelSpec,
    UnknownArchitectureError,
    check_architecture,
    create_model,
    load_numpy_state,
    state_to_numpy,
)
from flwr_kd.records import pack_models, record_to_state, state_to_record, unpack_models

SPECS = [ModelSpec(num_classes=10, in_chans=1, img_size=16), ModelSpec(3, 3, 28)]


@pytest.mark.parametrize(
    "spec", SPECS, ids=lambda s: f"{s.num_classes}c{s.in_chans}ch{s.img_size}px"
)
@pytest.mark.parametrize("arch", DEFAULT_ARCHITECTURES)
def test_default_architectures_build_for_small_images(arch, spec):
    torch.manual_seed(0)
    model = create_model(arch, spec)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(5, spec.in_chans, spec.img_size, spec.img_size))
    assert out.shape == (5, spec.num_classes)
    assert torch.isfinite(out).all()
    # trains in train mode too (BatchNorm needs batches > 1)
    model.train()
    model(torch.randn(2, spec.in_chans, spec.img_size, spec.img_size)).sum().backward()


def test_unknown_architecture_names_it_and_suggests_close_names():
    with pytest.raises(UnknownArchitectureError, match="unknown architecture 'resnet10'") as info:
        check_architecture("resnet10")
    assert "did you mean" in str(info.value)
    assert "resnet10t" in str(info.value)
    with pytest.raises(UnknownArchitectureError, match="'resnet10'"):
        create_model("resnet10", SPECS[0])


def test_unknown_architecture_without_close_names_points_to_timm():
    with pytest.raises(UnknownArchitectureError, match="timm.list_models") as info:
        check_architecture("zzzz_not_a_model_qqq")
    assert "zzzz_not_a_model_qqq" in str(info.value)
    assert "did you mean" not in str(info.value)


def test_unknown_architecture_error_is_a_value_error():
    assert issubclass(UnknownArchitectureError, ValueError)


def test_convnext_on_small_images_is_a_clear_error():
    spec = ModelSpec(10, 1, 16)
    with pytest.raises(
        UnknownArchitectureError, match=r"'convnext_atto' needs images of at least 32px"
    ):
        check_architecture("convnext_atto", spec)
    with pytest.raises(UnknownArchitectureError, match="the dataset has 16px"):
        create_model("convnext_atto", spec)
    check_architecture("convnext_atto")  # a valid name when no image size is given


def test_convnext_at_the_minimum_size_builds():
    spec = ModelSpec(10, 1, 32)
    model = create_model("convnext_atto", spec).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


# ---------------------------------------------------------------------------- numpy states


@pytest.mark.parametrize("arch", ["resnet10t", "test_vit"])
def test_state_to_numpy_and_load_numpy_state_round_trip(arch):
    spec = SPECS[0]
    torch.manual_seed(0)
    source = create_model(arch, spec)
    source.train()
    source(torch.randn(4, 1, 16, 16))  # move BatchNorm statistics away from their init
    torch.manual_seed(1)
    target = create_model(arch, spec)

    state = state_to_numpy(source)
    assert state.keys() == source.state_dict().keys()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    load_numpy_state(target, state)
    for key, value in target.state_dict().items():
        assert value.dtype == source.state_dict()[key].dtype
        assert torch.equal(value, source.state_dict()[key]), key

    x = torch.randn(3, 1, 16, 16)
    source.eval()
    target.eval()
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_state_to_numpy_is_a_copy():
    model = create_model("test_vit", SPECS[0])
    state = state_to_numpy(model)
    key = next(k for k, v in state.items() if v.dtype == np.float32)
    state[key][...] = 42.0
    assert not torch.all(model.state_dict()[key] == 42.0)


def test_load_numpy_state_casts_dtypes_and_keeps_integer_buffers():
    model = create_model("resnet10t", SPECS[0])
    state = {
        k: v.astype(np.float64) if v.dtype == np.float32 else v
        for k, v in state_to_numpy(model).items()
    }
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert counters, "resnet10t has BatchNorm counters"
    state[counters[0]] = np.array(7, dtype=np.int64)
    load_numpy_state(model, state)
    after = model.state_dict()
    assert after[counters[0]].dtype == torch.int64 and int(after[counters[0]]) == 7
    assert all(v.dtype in (torch.float32, torch.int64) for v in after.values())


def test_load_numpy_state_rejects_missing_keys():
    model = create_model("test_vit", SPECS[0])
    state = state_to_numpy(model)
    state.pop(next(iter(state)))
    with pytest.raises(KeyError):
        load_numpy_state(model, state)


# ---------------------------------------------------------------------------- records


def _toy_state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        "bn.counts": np.array([seed, seed + 1], dtype=np.int64),
        "fc.bias": rng.normal(size=(3,)).astype(np.float32),
    }


def test_pack_and_unpack_models_round_trip():
    real = state_to_numpy(create_model("test_vit", SPECS[0]))
    models = {"zeta": _toy_state(1), "alpha": _toy_state(2), "test_vit": real}
    record = pack_models(models)
    assert isinstance(record, ArrayRecord)
    assert len(record) == sum(len(s) for s in models.values())
    assert all("/" in key for key in record)

    back = unpack_models(record)
    assert list(back) == list(models)  # order of architectures kept
    for arch, state in models.items():
        assert list(back[arch]) == list(state)  # order of keys kept
        for key, value in state.items():
            assert back[arch][key].dtype == value.dtype
            assert back[arch][key].shape == value.shape
            np.testing.assert_array_equal(back[arch][key], value)


def test_unpack_models_splits_on_the_first_separator_only():
    back = unpack_models(pack_models({"arch": {"blocks/0/weight": np.ones(2, np.float32)}}))
    assert list(back) == ["arch"]
    assert list(back["arch"]) == ["blocks/0/weight"]


def test_pack_models_rejects_architecture_names_with_separator():
    with pytest.raises(ValueError, match="must not contain '/'"):
        pack_models({"org/model": _toy_state(0)})


def test_unpack_models_rejects_keys_without_separator():
    record = ArrayRecord({"weight": Array(np.zeros(3, np.float32))})
    with pytest.raises(ValueError, match="'weight' is not keyed '<architecture>/<name>'"):
        unpack_models(record)


def test_state_record_round_trip():
    state = _toy_state(3)
    back = record_to_state(state_to_record(state))
    assert list(back) == list(state)
    for key in state:
        assert back[key].shape == state[key].shape and back[key].dtype == state[key].dtype
        np.testing.assert_array_equal(back[key], state[key])


def test_records_keep_zero_dim_buffers_zero_dim():
    """BatchNorm's `num_batches_tracked` is a 0-d tensor; its shape must survive a record."""
    state = state_to_numpy(create_model("resnet10t", SPECS[0]))
    scalars = [k for k, v in state.items() if v.ndim == 0]
    assert scalars, "resnet10t has 0-d BatchNorm counters"
    via_record = record_to_state(state_to_record(state))
    via_pack = unpack_models(pack_models({"resnet10t": state}))["resnet10t"]
    for key in scalars:
        assert via_record[key].shape == (), key
        assert via_pack[key].shape == (), key


def test_npy_headers_are_never_parsed_by_two_threads_at_once(monkeypatch, tmp_path):
    """numpy parses every `.npy` header with `ast.literal_eval`; on CPython < 3.11.8 two threads
    doing that at once can raise "SystemError: AST constructor recursion depth mismatch"
    (python/cpython#106905; CI failed on it once in the serverless driver's thread pool).
    Every decoding path of flwr-kd must therefore parse one header at a time, whichever thread
    calls it. The parser is slowed down here, so unserialized threads would overlap."""
    import ast
    import io
    import threading
    import time

    from flwr_kd.records import load_npz, to_numpy
    from flwr_kd.serverless.arraystore import decode_npz, encode_npz
    from flwr_kd.state import LocalStateStore

    parse, guard = ast.literal_eval, threading.Lock()
    active, most = [0], [0]

    def slow_parse(source):
        with guard:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.002)  # releases the GIL: another thread may enter the parser now
        try:
            return parse(source)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(ast, "literal_eval", slow_parse)
    state = _toy_state(2)
    record, archive = state_to_record(state), encode_npz(state)
    LocalStateStore(tmp_path).save("node", state)
    decoders = [
        lambda: record_to_state(record),
        lambda: {k: to_numpy(v) for k, v in record.items()},
        lambda: unpack_models(pack_models({"a": state}))["a"],
        lambda: load_npz(io.BytesIO(archive)),
        lambda: decode_npz(archive),
        lambda: LocalStateStore(tmp_path).load("node"),
    ]
    results, errors = [], []

    def decode_all():
        try:
            for decode in decoders * 3:
                results.append(decode())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=decode_all) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(results) == 6 * 3 * len(decoders)
    for got in results:
        assert list(got) == list(state)
        for key in state:
            np.testing.assert_array_equal(got[key], state[key])
    assert most[0] == 1, f"{most[0]} threads parsed .npy headers at the same time"
