"""He et al.'s CIFAR ResNets (hf_largebatch.models.cifar_resnet): the published sizes, full resolution in the first
stage (what HF's ResNet, with its ImageNet stem, lacks), option-A shortcuts, and the HF Auto-class round trip."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoModelForImageClassification, ResNetConfig, ResNetForImageClassification

from hf_largebatch.models import CifarResNetConfig, CifarResNetForImageClassification


def _model(n: int) -> CifarResNetForImageClassification:
    torch.manual_seed(0)
    return CifarResNetForImageClassification(CifarResNetConfig(depths=[n, n, n], num_labels=10))


@pytest.mark.parametrize("n, published", [(3, 0.27e6), (9, 0.85e6)])
def test_parameter_counts_are_he_et_al_table_6(n, published):
    """ResNet-20 and ResNet-56 (He et al. 2016, table 6: 0.27M, 0.85M): option-A shortcuts add no parameters."""
    count = sum(p.numel() for p in _model(n).parameters())
    assert count == pytest.approx(published, rel=0.01)


def test_the_first_stage_sees_the_full_32_pixel_image():
    sizes = {}
    model = _model(3).eval()
    first, last = model.blocks[0], model.blocks[-1]
    first.register_forward_hook(lambda m, a, out: sizes.update(first=out.shape[-1]))
    last.register_forward_hook(lambda m, a, out: sizes.update(last=out.shape[-1]))
    model(torch.randn(2, 3, 32, 32))
    assert sizes == {"first": 32, "last": 8}  # 3 stages: 32, 16, 8
    hf = ResNetForImageClassification(ResNetConfig(depths=[3, 3, 3], hidden_sizes=[16, 32, 64], embedding_size=16,
                                                   layer_type="basic", downsample_in_first_stage=False))
    hf.resnet.encoder.stages[0].register_forward_hook(lambda m, a, out: sizes.update(hf_first=out.shape[-1]))
    hf(torch.randn(2, 3, 32, 32))
    assert sizes["hf_first"] == 8  # the ImageNet stem: why this model exists


def test_save_and_load_through_the_auto_classes(tmp_path):
    model = _model(3).eval()
    labels = torch.tensor([1, 7])
    x = torch.randn(2, 3, 32, 32)
    out = model(x, labels=labels)
    assert out.logits.shape == (2, 10)
    assert out.loss.item() == pytest.approx(torch.nn.functional.cross_entropy(out.logits, labels).item())
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is CifarResNetForImageClassification
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("settings, message", [
    ({"depths": [3, 3], "hidden_sizes": [16, 32, 64]}, "one depth per stage"),
    ({"hidden_sizes": [64, 32, 16]}, "must not shrink"),
])
def test_bad_configurations_are_refused(settings, message):
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match=message):
        CifarResNetConfig(**settings)
