"""vision_learner on timm models (by name, ``"timm/<name>"``, or constructor), no downloads."""

import pytest
import torch
from torch import nn

from mlx_train import accuracy, load_learner
from mlx_train.vision import AdaptiveConcatPool2d, ImageDataLoaders, TimmBody, vision_learner

pytestmark = pytest.mark.vision


def test_timm_resnet18_learns_digits(timm, digits32):
    dls = ImageDataLoaders.from_tensors(*digits32, valid_pct=0.2, seed=0, bs=64)
    torch.manual_seed(0)
    learn = vision_learner(dls, "timm/resnet18", metrics=accuracy, progress=False)
    body, head = learn.model
    assert isinstance(body, TimmBody) and body.needs_pool and body.num_features == 512
    assert isinstance(head[0], AdaptiveConcatPool2d) and head[2].num_features == 1024
    assert not any(isinstance(m, nn.Linear) for m in body.modules())  # classifier removed
    assert len(learn.splitter(learn.model)) == 2
    with learn.no_logging():
        learn.fit_one_cycle(3, 1e-2)
    acc = learn.recorder.values[-1][-1]
    print(f"digits 32x32, timm resnet18 from scratch, 3 epochs: validation accuracy {acc:.4f}")
    assert acc >= 0.9


def test_timm_constructor_weights_file_and_export(timm, tmp_path):
    from timm.models import mobilenetv3_small_050

    torch.manual_seed(1)
    ref = mobilenetv3_small_050()
    torch.save(ref.state_dict(), tmp_path / "m.pth")
    x, y = torch.rand(16, 3, 32, 32), torch.arange(16) % 3
    dls = ImageDataLoaders.from_tensors(x, y, valid_pct=0.25, seed=0, bs=4)
    learn = vision_learner(dls, mobilenetv3_small_050, weights=tmp_path / "m.pth",
                           path=tmp_path, progress=False)
    body = learn.model[0]
    assert isinstance(body, TimmBody)
    assert torch.equal(body.model.conv_stem.weight, ref.conv_stem.weight)
    assert not body.model.conv_stem.weight.requires_grad  # frozen with a weights file
    with learn.no_logging():
        learn.fit(1, 1e-3)
    loaded = load_learner(learn.export())
    assert torch.equal(learn.get_preds()[0], loaded.get_preds(dl=dls.valid)[0])


def test_names_torchvision_first_then_timm(timm, tvm):
    from mlx_train.vision import resolve_arch

    assert type(resolve_arch("resnet18")[0]).__module__.startswith("torchvision.")
    assert type(resolve_arch("timm/resnet18")[0]).__module__.startswith("timm.")
    assert type(resolve_arch("mobilenetv3_small_050")[0]).__module__.startswith("timm.")
    with pytest.raises(ValueError, match="unknown arch 'no_such_net'.*timm/<name>"):
        resolve_arch("no_such_net")
