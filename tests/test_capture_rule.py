"""The MMDiT capture rule (explicit > the Know3D checkpoint's > defaults) that the CLI pipeline and
the Extract Hidden States node share: knowledge.capture_spec."""
from know3d_core.knowledge import Know3DSpec, capture_spec
from know3d_core.mmdit.capture import DEFAULT_SIGMA, CaptureSpec


def test_checkpoint_capture_is_the_default_and_explicit_values_win():
    hidden = Know3DSpec("mmdit_hidden", 3 * 16, mmdit_layers=[1, 2, 4], sigma=0.4)
    assert capture_spec(hidden) == CaptureSpec(layers=(1, 2, 4), sigma=0.4)
    assert capture_spec(hidden, layers=(0,)) == CaptureSpec(layers=(0,), sigma=0.4)
    assert capture_spec(hidden, sigma=0.1) == CaptureSpec(layers=(1, 2, 4), sigma=0.1)


def test_no_checkpoint_or_another_kind_gives_the_defaults():
    assert capture_spec(None) == CaptureSpec(layers=None, sigma=DEFAULT_SIGMA)
    other = Know3DSpec("dino_image", 1024)
    assert capture_spec(other) == CaptureSpec(layers=None, sigma=DEFAULT_SIGMA)
    assert capture_spec(other, layers=(3,), sigma=0.5) == CaptureSpec(layers=(3,), sigma=0.5)
