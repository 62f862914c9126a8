import pytest
import torch
from torch import nn

from contrastseg.config import EvalConfig
from contrastseg.engine.inference_modes import _starts, infer_scores, slide_logits


class Conv(nn.Module):
    """A tiny 'segmenter' returning logits at the input size."""

    def __init__(self, kernel: int, classes: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, kernel, padding=kernel // 2)

    def forward(self, x):
        return {"seg": self.conv(x)}


def test_window_starts_cover_the_image():
    assert _starts(10, 4, 3) == [0, 3, 6]
    assert _starts(10, 10, 3) == [0]
    assert _starts(5, 8, 3) == [0]
    for size, crop, stride in [(37, 8, 5), (64, 32, 21), (9, 3, 3)]:
        covered = set()
        for s in _starts(size, crop, stride):
            assert s >= 0 and s + crop <= size
            covered |= set(range(s, s + crop))
        assert covered == set(range(size))


def test_slide_with_crop_equal_to_image_equals_whole():
    model = Conv(3).eval()
    x = torch.randn(2, 3, 20, 30)
    whole = infer_scores(model, x, EvalConfig(mode="whole"))
    slide = infer_scores(model, x, EvalConfig(mode="slide", crop_size=(20, 30), stride=(7, 9)))
    assert torch.allclose(whole, slide, atol=1e-6)


def test_slide_averages_overlapping_windows():
    model = Conv(3).eval()  # 3x3 with zero padding: window borders differ from the whole image
    x = torch.randn(1, 3, 10, 12)
    got = slide_logits(model, x, crop=(6, 8), stride=(4, 4))
    total = torch.zeros(1, 4, 10, 12)
    count = torch.zeros(10, 12)
    for top in (0, 4):
        for left in (0, 4):
            total[..., top : top + 6, left : left + 8] += model(
                x[..., top : top + 6, left : left + 8]
            )["seg"]
            count[top : top + 6, left : left + 8] += 1
    assert torch.allclose(got, total / count, atol=1e-6)
    assert not torch.allclose(got, model(x)["seg"], atol=1e-3)  # the windows really mattered


def test_flip_of_a_flip_symmetric_model_equals_single():
    model = Conv(1).eval()  # pointwise: flip-equivariant
    x = torch.randn(2, 3, 16, 16)
    single = infer_scores(model, x, EvalConfig())
    flipped = infer_scores(model, x, EvalConfig(flip=True))
    assert torch.allclose(single, flipped, atol=1e-6)


def test_flip_changes_a_non_symmetric_model():
    model = Conv(3).eval()
    with torch.no_grad():
        model.conv.weight[..., 0] += 1.0  # weights only on the left column: not symmetric
    x = torch.randn(1, 3, 16, 16)
    assert not torch.allclose(
        infer_scores(model, x, EvalConfig()),
        infer_scores(model, x, EvalConfig(flip=True)),
        atol=1e-3,
    )


def test_multi_scale_averages_probabilities_at_the_input_size():
    model = Conv(1).eval()
    x = torch.randn(1, 3, 16, 24)
    probs = infer_scores(model, x, EvalConfig(scales=(0.5, 1.0, 1.5)))
    assert probs.shape == (1, 4, 16, 24)
    assert torch.allclose(probs.sum(1), torch.ones(1, 16, 24), atol=1e-5)
    same = infer_scores(model, x, EvalConfig(scales=(1.0, 1.0)))
    assert torch.allclose(same, infer_scores(model, x, EvalConfig()), atol=1e-6)


def test_bad_eval_settings_are_config_errors():
    from contrastseg.config import load_config
    from contrastseg.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.scales"):
        load_config(None, ["eval.scales=[0.5, -1]"])
    with pytest.raises(ConfigError, match="eval.stride"):
        load_config(None, ["eval.crop_size=[8, 8]", "eval.stride=[9, 4]"])
