"""The report's pictures: samples drawn as small images, inline as data URIs."""

from __future__ import annotations

import base64
import io
import math

import numpy as np

from ..data import TableDataset

THUMB = 96  # longest side, pixels, of a picture from an image file


def _picture_layout(x: np.ndarray) -> tuple[np.ndarray | None, str]:
    """(N, H, W, C) float pictures (C 1 or 3) from an array of samples, or None, and why."""
    shape = x.shape[1:]
    if len(shape) == 1:
        d = shape[0]
        side = math.isqrt(d)
        if side * side == d:
            return x.reshape(len(x), side, side, 1), f"{side}x{side} grey, from {d} values"
        side = math.isqrt(d // 3)
        if 3 * side * side == d:
            pics = x.reshape(len(x), 3, side, side).transpose(0, 2, 3, 1)
            return pics, f"{side}x{side} colour, from {d} values"
        return None, f"samples of {d} values are not drawn as pictures"
    if len(shape) == 2:
        return x[..., None], f"{shape[0]}x{shape[1]} grey"
    if len(shape) == 3 and shape[0] in (1, 3):
        kind = "grey" if shape[0] == 1 else "colour"
        return x.transpose(0, 2, 3, 1), f"{shape[1]}x{shape[2]} {kind} (channels first)"
    if len(shape) == 3 and shape[2] in (1, 3):
        kind = "grey" if shape[2] == 1 else "colour"
        return x, f"{shape[0]}x{shape[1]} {kind} (channels last)"
    return None, f"samples of shape {tuple(shape)} are not drawn as pictures"


def _data_uri(image, fmt: str) -> str:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, "JPEG", quality=85)
    else:
        image.save(buffer, "PNG", optimize=True)
    kind = "jpeg" if fmt == "JPEG" else "png"
    return f"data:image/{kind};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def thumbnails(data, ids: list[int]) -> tuple[dict[int, str], bool, str]:
    """Data URIs of the pictures of ``ids``; whether they are small (drawn pixelated); a note."""
    from PIL import Image

    if data.files is not None:
        uris = {}
        for i in ids:
            with Image.open(data.files[i]) as image:
                uris[i] = _thumbnail(image.convert("RGB"))
        return uris, False, f"from the image files, at most {THUMB} px"
    table = data.dataset if isinstance(data.dataset, TableDataset) else None
    if table is not None and table.image:
        uris = {i: _thumbnail(table.picture(i)) for i in ids}
        return uris, False, f"from the stored images, at most {THUMB} px"
    if table is not None:  # an array column: the pictured rows and a sample for the scale
        spread = list(range(0, len(table), max(1, len(table) // 2000)))
        sample, _ = _picture_layout(table.stored(spread))
        rows, note = _picture_layout(table.stored(ids)) if ids else (None, "")
        if rows is None:
            return {}, False, note
        pictures = dict(zip(ids, rows, strict=True))
    else:
        every, note = _picture_layout(np.asarray(data.images))
        if every is None:
            return {}, False, note
        sample = every[:: max(1, len(every) // 2000)]
        pictures = {i: every[i] for i in ids}
    # One intensity scale for the whole data set (0.5 and 99.5 percentiles), so that pictures
    # compare with each other; per-picture stretching would make a faint sample look bold.
    sample = sample.astype(np.float64)
    low, high = np.nanpercentile(sample, [0.5, 99.5])
    scale = 255.0 / (high - low) if high > low else 1.0
    height, width = sample.shape[1:3]
    small = max(height, width) <= 48
    uris = {}
    for i in ids:
        pixels = np.clip((pictures[i].astype(np.float64) - low) * scale, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
        if small:  # a few hundred bytes as PNG; the browser enlarges it pixelated
            uris[i] = _data_uri(image, "PNG")
        else:
            uris[i] = _thumbnail(image.convert("RGB"))
    return uris, small, note


def _thumbnail(image) -> str:
    """A JPEG data URI of an RGB picture, at most THUMB pixels on its longest side."""
    from PIL import Image

    image.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    return _data_uri(image, "JPEG")
