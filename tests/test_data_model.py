"""The demo model's basic block is torchvision's, without importing torchvision in the kernel."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from tfa_widgets.data.model import BasicBlock


@pytest.mark.parametrize("stride, inplanes, planes", [(1, 8, 8), (2, 8, 16)])
@pytest.mark.parametrize("train", [True, False])
def test_basic_block_matches_torchvisions(stride, inplanes, planes, train):
    from torchvision.models.resnet import BasicBlock as TorchvisionBlock

    def down():
        if stride == 1 and inplanes == planes:
            return None
        conv = nn.Conv2d(inplanes, planes, 1, stride, bias=False)
        return nn.Sequential(conv, nn.BatchNorm2d(planes))

    torch.manual_seed(0)
    ours = BasicBlock(inplanes, planes, stride, down()).double()
    theirs = TorchvisionBlock(inplanes, planes, stride, down()).double()
    ours_state = {k: v.shape for k, v in ours.state_dict().items()}
    assert ours_state == {k: v.shape for k, v in theirs.state_dict().items()}  # weights load
    for tensor in ours.state_dict().values():  # non-trivial BatchNorm statistics too
        if tensor.is_floating_point():
            tensor.copy_(torch.rand_like(tensor) + 0.5)
    theirs.load_state_dict(ours.state_dict())
    ours.train(train)
    theirs.train(train)
    x = torch.randn(4, inplanes, 9, 9, dtype=torch.float64)
    expected = theirs(x.clone())
    # The same float64 operations in the same order: any difference is rounding, far below 1e-10
    # of the outputs' scale (a few units), while a wrong layer would differ by order one.
    torch.testing.assert_close(ours(x.clone()), expected, rtol=1e-10, atol=1e-10)


def test_loading_the_demo_model_does_not_import_torchvision():
    code = (
        "import sys\n"
        "from tfa_widgets.data import DemoResNet, load_demo\n"
        "from tfa_widgets.widgets import Explorer\n"
        "DemoResNet()\n"
        "print(sorted(m for m in ('torchvision', 'sympy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
