"""Weight files that are not tensors: each is one line naming the file and what it is, torch's advice to load
with ``weights_only=False`` is never repeated, and no code in a file ever runs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from kd_detr.models.backbone import read_state_dict_file
from kd_detr.pickle_scan import pickle_globals, starts_like_pickle, unsafe_globals


class _Runs:
    """Unpickling this would create a marker file (it must never happen)."""

    marker = ""

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _code_pickle(path: Path, marker: Path, protocol: int) -> Path:
    _Runs.marker = str(marker)
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": _Runs()}}, f, protocol=protocol)
    return path


@pytest.mark.parametrize("protocol", [2, 4])
def test_the_globals_a_pickle_would_import_are_read_not_run(tmp_path, protocol):
    marker = tmp_path / "ran"
    path = _code_pickle(tmp_path / "code.pth", marker, protocol)
    assert starts_like_pickle(path)
    assert pickle_globals(path) == unsafe_globals(path) == ["os.makedirs"]
    with pytest.raises(ValueError) as err:
        read_state_dict_file(path)
    assert str(err.value) == (f"{path}: a torch pickle that would import os.makedirs (code, not tensor data), "
                              "refused: only tensors and plain values are read from pickles; use a .safetensors file")
    assert not marker.exists()


def test_a_torch_zip_file_with_code_is_named_by_torch_s_own_finder(tmp_path):
    marker = tmp_path / "ran"
    _Runs.marker = str(marker)
    path = tmp_path / "zip.pth"
    torch.save({"model": {"w": _Runs()}}, path)
    assert not starts_like_pickle(path) and unsafe_globals(path) == ["os.makedirs"]
    with pytest.raises(ValueError, match="would import os.makedirs"):
        read_state_dict_file(path)
    assert not marker.exists()


def test_plain_state_dicts_ask_for_no_code(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"model": {"w": torch.ones(2)}}, path)
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert unsafe_globals(path) == [] and pickle_globals(legacy) == []
    assert list(read_state_dict_file(path)) == ["w"] and list(read_state_dict_file(legacy)) == ["w"]


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty_pickle"])
def test_unreadable_weight_files_are_one_line_naming_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "garbage":
        path.write_bytes(b"garbage bytes")
        expected = f"{path}: not a torch checkpoint (its pickle is unreadable: Unsupported operand 103); use a " \
                   ".safetensors or .pth file of tensors"
    elif kind == "truncated":
        torch.save({"w": torch.ones(100)}, path)
        path.write_bytes(path.read_bytes()[:300])
        expected = f"{path}: a truncated or corrupt torch checkpoint (its zip archive cannot be read)"
    else:
        torch.save({}, path)
        expected = f"{path} does not hold a state dict of tensors (top level: [])"
    with pytest.raises(ValueError) as err:
        read_state_dict_file(path)
    assert str(err.value) == expected
    assert "weights_only=False" not in str(err.value) and "\n" not in str(err.value)
