"""Corrupted files: the loader raises SparseFormatError and nothing else (no other exception, crash or hang).

Each test starts from a small valid file that uses every layout and index encoding, damages it
the way hypothesis chooses, and parses the result. Damage that happens to leave a valid file is
fine; any exception other than SparseFormatError fails the test.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from sparsesr.errors import SparseFormatError
from sparsesr.format import export_bytes, parse_bytes
from sparsesr.format.writer import encode_weight
from sparsesr.models import build_model
from sparsesr.models.checkpoint import Checkpoint

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


pytestmark = pytest.mark.usefixtures("one_thread")


def _split(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    header_len = int.from_bytes(data[:8], "little")
    return load_tensors(data), json.loads(data[8 : 8 + header_len])["__metadata__"]


def _valid_file() -> bytes:
    torch.manual_seed(0)
    model = build_model("edsr-baseline", 2, n_resblocks=2, n_feats=8).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    for name in names[1:-1]:
        weight = model.get_submodule(name).weight.data
        weight[weight.abs() < weight.abs().flatten().kthvalue(int(0.8 * weight.numel())).values] = 0
    ckpt = Checkpoint(state_dict=model.state_dict(), arch="edsr-custom", config=model.config)
    tensors, meta = _split(export_bytes(ckpt, dtype="fp16", layout="csr"))
    records = json.loads(meta["layers"])
    # One layer per layout / index encoding.
    for name, layout, index in [("body.0.body.0", "csr", "absolute"), ("body.0.body.2", "csr", "delta8"),
                                ("body.1.body.0", "csr", "bitmask"), ("body.1.body.2", "bsr", "absolute")]:
        for key in [k for k in tensors if k.startswith(f"{name}.weight")]:
            del tensors[key]
        weight = model.get_submodule(name).weight.detach().half()
        stored, records[name] = encode_weight(name, weight, layout, index=index)
        records[name]["dtype"] = "fp16"
        tensors.update(stored)
    meta["layers"] = json.dumps(records)
    return save_tensors(tensors, metadata=meta)


VALID = _valid_file()
TENSORS, METADATA = _split(VALID)
HEADER_END = 8 + int.from_bytes(VALID[:8], "little")


def parse_or_format_error(data: bytes) -> None:
    """Parsing either succeeds or raises SparseFormatError (pytest reports anything else)."""
    try:
        parse_bytes(data, source="fuzz")
    except SparseFormatError as exc:
        assert str(exc).startswith("fuzz: ")


def test_the_starting_file_is_valid():
    model_file = parse_bytes(VALID)
    assert {(layer.layout, layer.index) for layer in model_file.layers.values()} >= {
        ("csr", "absolute"), ("csr", "delta8"), ("csr", "bitmask"), ("bsr", "absolute"), ("dense", None)}


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)), min_size=1, max_size=8))
def test_flipped_bytes(flips):
    data = bytearray(VALID)
    for position, xor in flips:
        data[position] ^= xor
    parse_or_format_error(bytes(data))


@FUZZ
@given(st.integers(0, HEADER_END - 1), st.integers(1, 255))
def test_flipped_header_byte(position, xor):
    data = bytearray(VALID)
    data[position] ^= xor
    parse_or_format_error(bytes(data))


@FUZZ
@given(st.integers(0, len(VALID) - 1))
def test_truncated(length):
    with pytest.raises(SparseFormatError):
        parse_bytes(VALID[:length])


@FUZZ
@given(st.binary(max_size=200))
def test_garbage(data):
    with pytest.raises(SparseFormatError):
        parse_bytes(data)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)


@FUZZ
@given(st.sampled_from(sorted(METADATA)), st.one_of(st.text(max_size=30), JSON_VALUES.map(json.dumps)))
def test_edited_metadata_entry(key, value):
    meta = dict(METADATA, **{key: value})
    parse_or_format_error(save_tensors(TENSORS, metadata=meta))


LAYER_FIELDS = ["layout", "shape", "dtype", "sparsity", "nnz", "index", "block"]
CONFIG_FIELDS = ["n_resblocks", "n_feats", "res_scale", "scale", "n_colors", "rgb_range", "unknown"]


@FUZZ
@given(st.sampled_from(sorted(json.loads(METADATA["layers"]))), st.sampled_from(LAYER_FIELDS), JSON_VALUES)
def test_edited_layer_record(layer, field, value):
    records = json.loads(METADATA["layers"])
    records[layer][field] = value
    parse_or_format_error(save_tensors(TENSORS, metadata=dict(METADATA, layers=json.dumps(records))))


@FUZZ
@given(st.sampled_from(CONFIG_FIELDS), JSON_VALUES)
def test_edited_config(field, value):
    config = dict(json.loads(METADATA["config"]), **{field: value})
    parse_or_format_error(save_tensors(TENSORS, metadata=dict(METADATA, config=json.dumps(config))))


INDEX_KEYS = sorted(k for k, t in TENSORS.items() if not t.is_floating_point())
VALUE_KEYS = sorted(k for k, t in TENSORS.items() if t.is_floating_point())


@FUZZ
@given(st.sampled_from(INDEX_KEYS), st.data())
def test_edited_index_entry(key, data):
    tensor = TENSORS[key].clone()
    position = data.draw(st.integers(0, tensor.numel() - 1))
    info = torch.iinfo(tensor.dtype)
    tensor.view(-1)[position] = data.draw(st.integers(info.min, info.max))
    parse_or_format_error(save_tensors(dict(TENSORS, **{key: tensor}), metadata=METADATA))


@FUZZ
@given(st.sampled_from(INDEX_KEYS + VALUE_KEYS),
       st.sampled_from([torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                        torch.bfloat16, torch.float32, torch.float64, torch.bool]))
def test_wrong_dtype(key, dtype):
    data = save_tensors(dict(TENSORS, **{key: TENSORS[key].to(dtype)}), metadata=METADATA)
    wider_index = dtype in (torch.int16, torch.int32, torch.int64) and key.endswith(("row_ptr", "col_idx"))
    if dtype == TENSORS[key].dtype or wider_index:  # any int16/32/64 index type is allowed
        parse_bytes(data)
    else:
        with pytest.raises(SparseFormatError, match="dtype"):
            parse_bytes(data)


@FUZZ
@given(st.sampled_from(VALUE_KEYS), st.data(), st.sampled_from([math.nan, math.inf, -math.inf]))
def test_non_finite_values(key, data, bad):
    tensor = TENSORS[key].clone()
    tensor.view(-1)[data.draw(st.integers(0, tensor.numel() - 1))] = bad
    with pytest.raises(SparseFormatError, match="NaN or infinite"):
        parse_bytes(save_tensors(dict(TENSORS, **{key: tensor}), metadata=METADATA))


@FUZZ
@given(st.sampled_from(sorted(TENSORS)), st.data())
def test_reshaped_or_dropped_tensor(key, data):
    tensor = TENSORS[key].reshape(-1)
    cut = data.draw(st.integers(0, tensor.numel()))
    edited = dict(TENSORS)
    if data.draw(st.booleans()):
        edited[key] = tensor[:cut].clone()
    else:
        del edited[key]
    if edited.get(key) is not None and tuple(edited[key].shape) == tuple(TENSORS[key].shape):
        return  # nothing changed
    with pytest.raises(SparseFormatError):
        parse_bytes(save_tensors(edited, metadata=METADATA))


# --- the checkpoint loader shares the config checks (#15.13) ----------------------------------------

CHECKPOINT_TENSORS = {k: v.contiguous() for k, v in
                      build_model("edsr-baseline", 2, n_resblocks=1, n_feats=4).state_dict().items()}
CHECKPOINT_CONFIG = build_model("edsr-baseline", 2, n_resblocks=1, n_feats=4).config.to_dict()


@FUZZ
@given(st.sampled_from(CONFIG_FIELDS), JSON_VALUES)
def test_edited_checkpoint_config(tmp_path_factory, field, value):
    """A checkpoint with any edited config field loads or raises CheckpointError, nothing else."""
    from sparsesr.errors import CheckpointError
    from sparsesr.models.checkpoint import load_model

    path = tmp_path_factory.mktemp("ckpt") / "c.safetensors"
    config = dict(CHECKPOINT_CONFIG, **{field: value})
    path.write_bytes(save_tensors(CHECKPOINT_TENSORS, metadata={"config": json.dumps(config)}))
    try:
        load_model(path)
    except CheckpointError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
