"""Small images resized on the device: the same augmentation as resizing in the loader, scaled down."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from data.transforms import PadCropFlip, ResizeNormalize, build_transform, device_transform, reflect_index

CONFIG = {
    "input_size": (3, 224, 224),
    "mean": (0.49, 0.48, 0.45),
    "std": (0.25, 0.24, 0.26),
    "interpolation": "bicubic",
    "crop_pct": 0.9,
}


def smooth_image(seed: int, size: int = 32) -> Image.Image:
    """A natural-looking small image: smooth colour fields (no pixel noise, which no resize preserves)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 6, 6, generator=g)
    fine = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0]
    return Image.fromarray((fine.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def test_pad_crop_flip_equals_torchvision_with_the_same_seed():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    reference = T.Compose([T.RandomCrop(32, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip()])
    ours = PadCropFlip(32, padding=4)
    for seed in range(40):  # covers flips and every corner of the offset range
        torch.manual_seed(seed)
        expected = reference(image)
        torch.manual_seed(seed)
        assert torch.equal(ours(image), expected), seed


def test_reflect_index_matches_reflect_padding():
    row = torch.arange(10)[None, None, :].float()
    padded = torch.nn.functional.pad(row, (3, 3), mode="reflect")[0, 0].long()
    assert torch.equal(reflect_index(-3, 16, 10), padded)


@pytest.mark.parametrize("top,left,flip", [(0, 0, False), (4, 4, True), (8, 3, False), (2, 8, True)])
def test_device_path_matches_the_cpu_chain_on_the_same_crop(top, left, flip):
    """Today's chain: upsample to 224, reflect-pad 28, crop at (7 top, 7 left), flip, normalise.
    Device path: reflect-pad 4 and crop at (top, left) at 32 px, flip, then upsample and normalise."""
    image = smooth_image(top * 10 + left)
    big = TF.resize(image, 224, interpolation=T.InterpolationMode.BICUBIC)
    cpu = TF.crop(TF.pad(big, 28, padding_mode="reflect"), 7 * top, 7 * left, 224, 224)
    cpu = TF.normalize(TF.to_tensor(TF.hflip(cpu) if flip else cpu), CONFIG["mean"], CONFIG["std"])

    small = TF.pil_to_tensor(image)
    rows, cols = reflect_index(top - 4, 32, 32), reflect_index(left - 4, 32, 32)
    small = small[:, rows][:, :, cols.flip(0) if flip else cols]
    device = ResizeNormalize(224, CONFIG["mean"], CONFIG["std"])(small[None])[0]

    std = torch.tensor(CONFIG["std"])[:, None, None]
    difference = ((device - cpu) * std).abs()  # in [0, 1] pixel units
    # PIL's and torch's bicubic kernels differ slightly; at the crop's edges the upsampling sees clamped
    # instead of real neighbours (2 native pixels = 14 px), so the tight bound is for the interior.
    assert difference.mean() < 0.01, difference.mean()
    interior = difference[:, 14:-14, 14:-14]
    assert interior.quantile(0.99) < 0.03, interior.quantile(0.99)


def test_loader_ships_native_uint8_and_the_device_finishes():
    train = build_transform(CONFIG, native_size=32, is_training=True, augment=True)
    sample = train(smooth_image(0))
    assert sample.dtype == torch.uint8 and sample.shape == (3, 32, 32)
    prepare = device_transform(CONFIG, native_size=32)
    out = prepare(torch.stack([sample, sample]))
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    evaluation = build_transform(CONFIG, native_size=32, is_training=False, augment=False)
    assert evaluation(smooth_image(1)).dtype == torch.uint8
    # at the native size (or above 64 px) nothing moves to the device
    assert device_transform({**CONFIG, "input_size": (3, 32, 32)}, native_size=32) is None
    assert device_transform(CONFIG, native_size=96) is None
    assert build_transform(CONFIG, 32, True, True, on_device=False)(smooth_image(0)).shape == (3, 224, 224)
