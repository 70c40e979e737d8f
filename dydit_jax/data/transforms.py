"""Image preprocessing (numpy / PIL only, no TensorFlow)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM / DiT center crop, as in DiT's ``train.py``.

    Halve the image with ``Image.BOX`` while its short side is at least
    ``2 * image_size``, resize with ``Image.BICUBIC`` so that the short side equals
    ``image_size`` (long side ``round(x * scale)``), then take the central
    ``image_size x image_size`` crop. Returns ``uint8 [image_size, image_size, C]``.
    """
    if isinstance(pil_image, np.ndarray):
        pil_image = Image.fromarray(pil_image)
    img = pil_image
    # Cheap anti-aliased reduction first: box-filter halvings while the short side is at
    # least twice the target, then one bicubic resize to the exact short side.
    while min(img.size) >= 2 * image_size:
        width, height = img.size
        img = img.resize((width // 2, height // 2), resample=Image.BOX)
    ratio = image_size / min(img.size)
    width, height = img.size
    img = img.resize((round(width * ratio), round(height * ratio)), resample=Image.BICUBIC)
    pixels = np.asarray(img)
    top = (pixels.shape[0] - image_size) // 2
    left = (pixels.shape[1] - image_size) // 2
    return np.array(pixels[top:top + image_size, left:left + image_size])


def resize_short_center_crop(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Latte's ``UCFCenterCropVideo`` for one frame: a bilinear resize that makes the short
    side ``image_size`` (long side ``floor(L * image_size / short)``), then the central
    ``image_size x image_size`` crop (offsets rounded as torchvision's ``center_crop``).
    PIL's bilinear filter widens its support when shrinking (anti-aliased; torch's
    ``interpolate`` in Latte does not), so strong downscaling differs slightly from Latte's.
    Returns ``uint8 [image_size, image_size, C]``."""
    if isinstance(pil_image, np.ndarray):
        pil_image = Image.fromarray(pil_image)
    width, height = pil_image.size
    short = min(width, height)
    size = (width * image_size // short, height * image_size // short)
    pixels = np.asarray(pil_image.resize(size, resample=Image.BILINEAR))
    top = int(round((pixels.shape[0] - image_size) / 2))
    left = int(round((pixels.shape[1] - image_size) / 2))
    return np.array(pixels[top:top + image_size, left:left + image_size])


def to_pil_rgb(image) -> Image.Image:
    """Encoded bytes (JPEG/PNG...), a PIL image or a uint8 array -> RGB PIL image."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(image)))
    elif isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        image = Image.fromarray(image)
    return image.convert("RGB")


def uint8_to_unit(arr: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (``ToTensor`` + ``Normalize(0.5, 0.5)``)."""
    return arr.astype(np.float32) * np.float32(1.0 / 127.5) - np.float32(1.0)
