"""User checkpoints load with weights_only=True; anything needing arbitrary unpickling is refused"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tfa_widgets.core.errors import DatasetError, TFAError
from tfa_widgets.data import DemoResNet, load_checkpoint


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return DemoResNet(num_classes=3, widths=(4, 8, 8), blocks=(1, 1, 1))


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_state_dict_round_trip_into_a_model(tmp_path):
    src = _model(0)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = load_checkpoint(tmp_path / "w.pt", _model(1))
    assert _same(src, dst) and not dst.training
    state = load_checkpoint(tmp_path / "w.pt")
    assert isinstance(state, dict) and torch.equal(state["fc.weight"], src.fc.weight)


def test_nested_and_data_parallel_state_dicts(tmp_path):
    src = _model(0)
    wrapped = {f"module.{k}": v for k, v in src.state_dict().items()}
    torch.save({"epoch": 3, "model_state_dict": wrapped}, tmp_path / "ckpt.pth")
    assert _same(src, load_checkpoint(tmp_path / "ckpt.pth", _model(1)))


def test_safetensors_file(tmp_path):
    src = _model(0)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    assert _same(src, load_checkpoint(tmp_path / "w.safetensors", _model(1)))


class Payload:
    """Stands for any pickled object that weights_only loading must refuse."""

    def __init__(self) -> None:
        self.note = "unpickling me imports this test module"


def test_arbitrary_pickles_are_refused(tmp_path):
    torch.save({"state_dict": _model().state_dict(), "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(DatasetError, match="arbitrary unpickling") as err:
        load_checkpoint(tmp_path / "evil.pt")
    assert "evil.pt" in str(err.value) and "state_dict" in str(err.value)
    torch.save(_model(), tmp_path / "whole_model.pt")  # a pickled nn.Module, not a state_dict
    with pytest.raises(DatasetError, match="refused to load .*whole_model.pt"):
        load_checkpoint(tmp_path / "whole_model.pt", _model())


def test_missing_truncated_and_mismatched_files(tmp_path):
    with pytest.raises(DatasetError, match=r"checkpoint .*nope\.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save(_model().state_dict(), tmp_path / "w.pt")
    blob = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(DatasetError, match=r"cut\.pt is not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DatasetError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "bad.safetensors")
    other = DemoResNet(num_classes=5, widths=(4, 8, 8), blocks=(1, 1, 1))
    with pytest.raises(DatasetError, match="does not fit DemoResNet"):
        load_checkpoint(tmp_path / "w.pt", other)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(TFAError, match="holds no state_dict"):
        load_checkpoint(tmp_path / "list.pt")
