"""``data.decoder=pillow_draft``: JPEGs decoded at 1/2, 1/4 or 1/8 of their size where the crop
allows it.

libjpeg can scale an image down while it decodes (in the DCT domain, Pillow's ``Image.draft``),
which skips most of the work of a full decode. RandomResizedCrop draws its box from the image's full
size before it resamples, and the size is in the JPEG's header: so the box is drawn first, from the
same random numbers and the same full size as torchvision's (``RandomResizedCrop.make_params``),
then the image is decoded at the smallest scale at which the box still holds at least the output's
pixels (so the last resize is never an enlargement), and the box, mapped to that scale, is resampled
to the output (bicubic, Pillow). Where no scale of 1/2 or less fits, the image is decoded whole and
cropped exactly as torchvision does. The crop, flip and mask of every sample are the same as with
``data.decoder=pillow``; the pixels differ a little where a scaled decode was used (measured in
tests/test_prepare.py and docs/results.md).

Only JPEGs without an EXIF rotation are opened undecoded; other images are decoded as usual.
"""

from __future__ import annotations

import io
import math
from typing import Any

from PIL import ExifTags, Image, JpegImagePlugin
from torchvision.transforms import v2


def open_jpeg(raw: dict[str, Any]) -> Image.Image | None:
    """The JPEG of an undecoded ``datasets.Image`` value (bytes or a path), opened: only its header
    is read. None when it is not a JPEG or carries an EXIF orientation (which ``datasets`` applies
    when it decodes, and the crop must be drawn from the turned size)."""
    image = Image.open(io.BytesIO(raw["bytes"])) if raw.get("bytes") else Image.open(raw["path"])
    if not isinstance(image, JpegImagePlugin.JpegImageFile) or image.getexif().get(
        ExifTags.Base.Orientation
    ):
        image.close()
        return None
    return image


def draft_scale(
    full: tuple[int, int], box: tuple[int, int], out: tuple[int, int]
) -> tuple[int, int]:
    """The size (width, height) to ask ``Image.draft`` for, so that the scale it picks (the largest
    of 1/8, 1/4, 1/2 that keeps the image at least this large) leaves the box (width, height) at
    least ``out``."""
    return math.ceil(full[0] * out[0] / box[0]), math.ceil(full[1] * out[1] / box[1])


class DraftResizedCrop(v2.RandomResizedCrop):
    """``RandomResizedCrop`` (the same parameters, drawn by torchvision from the image's full size)
    for an opened, not yet decoded JPEG, which it decodes at a reduced scale where the box allows,
    in ``mode``. A decoded image is cropped exactly as ``RandomResizedCrop`` does."""

    def __init__(self, size: list[int], scale: tuple[float, float], mode: str) -> None:
        super().__init__(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC)
        self.mode = mode

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        top, left, h, w = params["top"], params["left"], params["height"], params["width"]
        out_h, out_w = self.size
        image, scale = inpt, 1.0
        if isinstance(image, JpegImagePlugin.JpegImageFile) and image.tile:  # opened, not decoded
            full = image.size
            drafted = image.draft(self.mode, draft_scale(full, (w, h), (out_w, out_h)))
            # its box: the full size at the scale
            scale = full[0] / drafted[1][2] if drafted else 1.0
            image.load()
            image = image if image.mode == self.mode else image.convert(self.mode)
        if scale == 1.0:
            return super().transform(image, params)
        box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
        return image.resize((out_w, out_h), Image.Resampling.BICUBIC, box=box)


def takes_undecoded(transform: Any) -> bool:
    """Whether ``transform`` (a ``v2.Compose`` or one transform) starts with a
    ``DraftResizedCrop``."""
    first = (
        transform.transforms[0]
        if isinstance(transform, v2.Compose) and transform.transforms
        else transform
    )
    return isinstance(first, DraftResizedCrop)
