"""Images → the vision tower's input, exactly as transformers' Qwen2VLImageProcessor computes it.

Qwen3.5 checkpoints ship a ``preprocessor_config.json`` for transformers'
``Qwen2VLImageProcessor``; its PIL flavour (``Qwen2VLImageProcessorPil``) is the reference.
(Where torchvision is installed, transformers' AutoImageProcessor picks the torchvision flavour,
whose resize of tensors rounds differently: pixel values up to ~0.04 apart on the images tried.)
An image takes five steps to become the rows the tower reads:

1. **read**: a file (through Pillow, an optional extra), a Pillow image, or a NumPy array
   ``[H, W, 3] uint8`` — always RGB; a Pillow image's transparency is composited onto white,
   a file's alpha band is dropped (the reference's two paths differ: see :func:`read_image`);
2. **smart_resize**: pick the size nearest the original whose sides are multiples of
   ``patch_size × merge_size`` and whose area lies within ``[min_pixels, max_pixels]``;
3. **resize** to it with Pillow's bicubic filter (:func:`resize`) — Pillow's own where it is
   installed, else its NumPy twin, the same bit for bit (:func:`resize_numpy`), so that
   arrays need no Pillow;
4. **rescale and normalise**: ``(pixel · rescale_factor − mean) / std`` per channel, float32;
5. **patchify**: cut into ``patch_size²`` squares, ordered so that every ``merge_size²``
   neighbours are consecutive (the merger will fuse them), each square repeated over
   ``temporal_patch_size`` frames — a still image is a clip of identical frames.

The result is ``pixel_values [patches, C·T·P·P]`` and ``grid_thw = (t, h, w)`` in patches.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import is_present, read_json_object
from .errors import MinqwenError, is_finite_number

# The reference processor class's own defaults (Qwen2-VL's), used for fields a
# preprocessor_config.json leaves out, exactly as transformers does.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow's resampling filter numbers, as config files store them.
BILINEAR, BICUBIC = 2, 3

# What minqwen does with each preprocessor_config.json field.
PREPROCESSOR_FIELDS: dict[str, str] = {
    "do_resize": "honoured (default true): false keeps the size, which must then fit the patch grid",
    "size": "honoured: shortest_edge is the minimum pixel count, longest_edge the maximum (both, and nothing else)",
    "min_pixels": "honoured: the legacy name of size.shortest_edge (wins over it unless null, as in the reference)",
    "max_pixels": "honoured: the legacy name of size.longest_edge (wins over it unless null, as in the reference)",
    "resample": "honoured: 3 (bicubic, default) or 2 (bilinear), Pillow's filters bit for bit",
    "do_rescale": "honoured (default true)",
    "rescale_factor": "honoured (default 1/255)",
    "do_normalize": "honoured (default true)",
    "image_mean": "honoured (default OpenAI CLIP's): one value per channel, or one for all",
    "image_std": "honoured (default OpenAI CLIP's): one value per channel, or one for all",
    "patch_size": "honoured (default 14): must equal vision_config.patch_size",
    "temporal_patch_size": "honoured (default 2): must equal vision_config.temporal_patch_size",
    "merge_size": "honoured (default 2): must equal vision_config.spatial_merge_size",
    "do_convert_rgb": "ignored: minqwen always converts to RGB, the three channels the tower reads",
    "do_center_crop": "ignored as the reference ignores it (Qwen2-VL preprocessing never crops)",
    "crop_size": "ignored as the reference ignores it",
    "do_pad": "ignored as the reference ignores it",
    "pad_size": "ignored as the reference ignores it",
    "default_to_square": "ignored as the reference ignores it",
    "data_format": "ignored: arrays are always [H, W, 3]",
    "input_data_format": "ignored: arrays are always [H, W, 3]",
    "return_tensors": "ignored",
    "device": "ignored",
    "disable_grouping": "ignored",
    "image_processor_type": "metadata",
    "processor_class": "metadata",
    "feature_extractor_type": "metadata",
    "_processor_class": "metadata",
}


@dataclass(frozen=True)
class PreprocessorConfig:
    """The image preprocessor's settings (``preprocessor_config.json``), validated."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    do_resize: bool = True
    resample: int = BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    source: str = field(default="<dict>", compare=False)

    @property
    def factor(self) -> int:
        """Both sides of a resized image are multiples of this: one merged patch."""
        return self.patch_size * self.merge_size


def load_preprocessor_config(path: str | Path) -> PreprocessorConfig:
    """The image preprocessor's settings, from a checkpoint folder or a file, found as transformers finds them.

    In a folder: the ``"image_processor"`` block of ``processor_config.json`` when it has one
    (transformers 5 saves a processor's settings there, and writes no preprocessor_config.json),
    else ``preprocessor_config.json`` (the releases' file). A file is read the same way: its
    ``"image_processor"`` block if it has one, else the whole file.
    """
    path = Path(path)
    if path.is_dir():
        nested = path / "processor_config.json"
        if is_present(nested) and "image_processor" in (raw := read_json_object(nested)):
            return _image_processor_block(raw, nested)
        path = path / "preprocessor_config.json"
    if not is_present(path):
        raise MinqwenError(
            f"{path}: no preprocessor_config.json here (nor a processor_config.json with an \"image_processor\" "
            "block); the checkpoint's image preprocessing settings (pixel budget, mean, std) come from it — copy it "
            "from the model's release"
        )
    raw = read_json_object(path)
    if "image_processor" in raw:
        return _image_processor_block(raw, path)
    return preprocessor_config_from_dict(raw, source=str(path))


def _image_processor_block(raw: dict, path: Path) -> PreprocessorConfig:
    block = raw["image_processor"]
    if not isinstance(block, dict):
        raise MinqwenError(f"{path}: field 'image_processor' must be a JSON object (the image processor's "
                           f"settings), got {type(block).__name__}")
    return preprocessor_config_from_dict(block, source=f"{path} (its \"image_processor\" block)")


def preprocessor_config_from_dict(raw: dict, source: str = "<dict>") -> PreprocessorConfig:
    """Validate a preprocessor_config.json dictionary; reference defaults fill what it leaves out."""
    unknown = sorted(k for k in raw if k not in PREPROCESSOR_FIELDS)
    if unknown:
        warnings.warn(f"{source}: preprocessor fields minqwen does not know were not used: {', '.join(unknown)}",
                      stacklevel=2)
    defaults = PreprocessorConfig()

    def integer(name, value, minimum=1):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise MinqwenError(f"{source}: field '{name}' must be an integer ≥ {minimum}, got {value!r}")
        return value

    def flag(name):
        value = raw.get(name, getattr(defaults, name))
        if not isinstance(value, bool):
            raise MinqwenError(f"{source}: field '{name}' must be true or false, got {value!r}")
        return value

    def per_channel(name):
        value = raw.get(name, getattr(defaults, name))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * 3  # one number stands for every channel, as in the reference
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(isinstance(v, (int, float)) and is_finite_number(v) for v in value)):
            raise MinqwenError(f"{source}: field '{name}' must be three finite numbers (R, G, B), got {value!r}")
        return tuple(float(v) for v in value)

    # As the reference's constructor: size (the class default when absent) replaced whole, not
    # merged with the default; the legacy min_pixels / max_pixels, when not null, written over
    # it; and then it must hold exactly shortest_edge and longest_edge.
    size = raw.get("size")
    if size is None:
        size = {"shortest_edge": defaults.min_pixels, "longest_edge": defaults.max_pixels}
    if not isinstance(size, dict):
        raise MinqwenError(f"{source}: field 'size' must be an object with shortest_edge and longest_edge")
    size = dict(size)
    for legacy, key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        if raw.get(legacy) is not None:
            size[key] = raw[legacy]
            size.pop(legacy, None)  # an old save's size {min_pixels, max_pixels}, superseded
    if set(size) != {"shortest_edge", "longest_edge"}:
        raise MinqwenError(f"{source}: field 'size' must hold exactly shortest_edge and longest_edge (the pixel "
                           f"budget; or give min_pixels / max_pixels), got {sorted(size)}")
    min_pixels = integer("size.shortest_edge (min_pixels)", size["shortest_edge"])
    max_pixels = integer("size.longest_edge (max_pixels)", size["longest_edge"])
    if min_pixels > max_pixels:
        raise MinqwenError(f"{source}: the pixel budget is empty: min_pixels {min_pixels} > max_pixels {max_pixels}")

    resample = raw.get("resample", defaults.resample)
    if resample not in (BILINEAR, BICUBIC) or isinstance(resample, bool):
        raise MinqwenError(
            f"{source}: field 'resample' is {resample!r}; minqwen implements Pillow's bicubic (3) and bilinear (2)"
        )
    rescale_factor = raw.get("rescale_factor", defaults.rescale_factor)
    if not isinstance(rescale_factor, (int, float)) or not is_finite_number(rescale_factor):
        raise MinqwenError(f"{source}: field 'rescale_factor' must be a finite number, got {rescale_factor!r}")
    std = per_channel("image_std")
    if 0.0 in std:
        raise MinqwenError(f"{source}: field 'image_std' must not contain 0 (it divides)")

    config = PreprocessorConfig(
        patch_size=integer("patch_size", raw.get("patch_size", defaults.patch_size)),
        temporal_patch_size=integer("temporal_patch_size", raw.get("temporal_patch_size", defaults.temporal_patch_size)),
        merge_size=integer("merge_size", raw.get("merge_size", defaults.merge_size)),
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        do_resize=flag("do_resize"),
        resample=resample,
        do_rescale=flag("do_rescale"),
        rescale_factor=float(rescale_factor),
        do_normalize=flag("do_normalize"),
        image_mean=per_channel("image_mean"),
        image_std=std,
        source=source,
    )
    # Numbers finite in JSON can still leave float32, in which pixels are normalised (a std of
    # 1e-320 is 0 there, a mean of 1e300 infinite): the darkest and brightest pixels must come out finite.
    with np.errstate(all="ignore"):
        extremes = normalize(np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8), config)  # [3, 1, 2]
    if not np.isfinite(extremes).all():
        raise MinqwenError(f"{source}: fields 'rescale_factor' ({config.rescale_factor:g}), 'image_mean' "
                           f"{list(config.image_mean)} and 'image_std' {list(config.image_std)} give pixel values "
                           f"that float32 cannot hold (infinite or NaN); released checkpoints have 1/255 and "
                           f"values near 0.5")
    return config


# ==================================================================== 1. reading


def read_image(image) -> np.ndarray:
    """An image as RGB ``[H, W, 3] uint8``: from a NumPy array, a Pillow image, or a file path.

    Arrays need nothing else; images and files need Pillow (``pip install pillow``).
    Transparency follows the reference, whose two paths differ: a Pillow image's is composited
    onto white (its ``convert_to_rgb``), but a file is opened by its ``load_image``, which
    converts to RGB first and so drops an alpha band (a transparent pixel keeps its stored
    colour); only a transparent colour (PNG/GIF tRNS) survives that to be composited.
    """
    if isinstance(image, np.ndarray):
        return _checked_array(image)
    if isinstance(image, (str, Path)):
        return _read_file(Path(image))
    if type(image).__module__.startswith("PIL."):
        _warn_if_clipped(image, "this Pillow image")
        try:
            rgb = _pil_to_rgb(image)
        except (OSError, ValueError) as e:  # a truncated file behind it, or an image already closed
            raise MinqwenError(f"cannot read this Pillow image ({e})") from None
        return _checked_array(rgb, what="image")
    raise MinqwenError(
        f"an image must be a file path, a Pillow image or a NumPy array [H, W, 3] uint8; got {type(image).__name__}"
    )


def _checked_array(array: np.ndarray, what: str = "image array") -> np.ndarray:
    if array.ndim != 3 or array.shape[2] != 3:
        raise MinqwenError(f"{what} must have shape [H, W, 3] (RGB, channels last), got {list(array.shape)}")
    if array.dtype != np.uint8:
        raise MinqwenError(f"{what} must be uint8 (0…255 per channel), got dtype {array.dtype}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise MinqwenError(f"{what} is empty: {array.shape[1]}×{array.shape[0]} pixels")
    return array


def _pillow():
    try:
        import PIL.Image
    except ImportError:
        raise MinqwenError(
            "reading image files needs Pillow, an optional extra: pip install pillow "
            "(or pass the image as a NumPy array [H, W, 3] uint8)"
        ) from None
    return PIL.Image


def _read_file(path: Path) -> np.ndarray:
    Image = _pillow()
    from PIL import ImageOps

    if path.is_dir():
        raise MinqwenError(f"{path}: is a folder, not an image file")
    if not path.exists():  # (a pipe, /dev/stdin or <(…), exists without being a regular file: read it)
        raise MinqwenError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later
            _warn_if_clipped(img, str(path))
            # The reference's path for a file: its load_image turns the stored pixels upright by
            # the camera's EXIF orientation tag and converts to RGB — an alpha band is dropped
            # there — then its convert_to_rgb, as for any Pillow image, composites onto white
            # what is still marked transparent: a palette's or grey's transparent colour (tRNS),
            # which Pillow's conversion keeps as an RGB colour.
            rgb = _pil_to_rgb(ImageOps.exif_transpose(img).convert("RGB"))
    except Image.DecompressionBombError as e:
        raise MinqwenError(f"{path}: refused, too many pixels to decode safely ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
        raise MinqwenError(f"{path}: cannot read this image file ({e})") from None
    return _checked_array(rgb, what=f"{path}: image")


# Pillow modes of more than 8 bits a channel: its conversion to RGB clips them to 0…255 instead of
# scaling (a 16-bit grey scan comes out mostly white, a float image in 0…1 black), in the reference too.
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _warn_if_clipped(img, what: str) -> None:
    if img.mode in WIDE_MODES:
        warnings.warn(f"{what}: Pillow mode {img.mode} (more than 8 bits a channel) becomes RGB as the reference "
                      "makes it, by clipping every value to 0…255, not by scaling: scale it to 8 bits first if "
                      "its values go beyond 255 (or it is a float image in 0…1)", stacklevel=3)


def _pil_to_rgb(img) -> np.ndarray:
    """A Pillow image as RGB, transparency composited onto white (the reference's ``convert_to_rgb``)."""
    Image = _pillow()
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.array(img.convert("RGB"))


# ==================================================================== 2. choosing the size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size (h, w) nearest to (height, width) with both sides multiples of ``factor`` and
    ``min_pixels ≤ h·w ≤ max_pixels``, the aspect ratio kept as closely as the grid allows.

    The budget is met as the reference meets it, not always exactly: a side never drops below
    ``factor`` (a very long, thin image can stay above max_pixels), and rounding both sides up
    to reach min_pixels can overshoot max_pixels (when the two are close, or the image is long
    and thin). Rounding is Python's ``round`` (half to even), as in the reference.
    """
    if height < 1 or width < 1:
        raise MinqwenError(f"the image is empty: {width}×{height} pixels")
    if max(height, width) / min(height, width) > 200:
        raise MinqwenError(
            f"the image is {width}×{height} pixels, an aspect ratio above 200:1, which the "
            "preprocessing refuses (as the reference does); crop it first"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)  # shrink both sides by the same ratio
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))  # grow both sides by the same ratio
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ==================================================================== 3. resizing (Pillow's filters)
#
# Pillow resizes an 8-bit image in two passes, one per axis, rounding to 8 bits in between:
# Pillow 12 and older always go horizontal first, Pillow 13 sometimes vertical first (see
# vertical_pass_first), and with the rounding the order shows in the result. Each output
# pixel is a weighted sum of the input pixels under a filter centred on it; when shrinking,
# the filter is stretched by the shrink factor, so every input pixel counts (an antialiased
# resize). The weights are normalised to sum to one, then
# turned into fixed-point integers with 22 fractional bits; sums start at one half (for
# rounding), are shifted back down and clipped to 0…255.

PRECISION_BITS = 32 - 8 - 2


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's cubic convolution kernel (a = −0.5), support 2."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    """The triangle kernel, support 1."""
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


FILTERS = {BICUBIC: (_bicubic, 2.0), BILINEAR: (_bilinear, 1.0)}


def resample_weights(in_size: int, out_size: int, resample: int = BICUBIC) -> tuple[np.ndarray, np.ndarray]:
    """For each output pixel along one axis: the first input pixel it reads, and fixed-point weights.

    Returns ``first [out]`` and ``weights [out, taps]`` (int64; taps past the image edge are 0).
    """
    kernel, support = FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)  # stretch the kernel only when shrinking
    support = support * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale  # [out]: where each output pixel sits in the input
    # C's (int) cast truncates toward zero; bounds are then clipped to the image.
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)  # [out]
    last = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size)  # [out], exclusive
    count = last - first  # [out]
    k = np.arange(taps)  # [taps]
    w = kernel((first[:, None] + k - center[:, None] + 0.5) * (1.0 / filterscale))  # [out, taps]
    w = np.where(k < count[:, None], w, 0.0)
    total = np.zeros(out_size)  # [out]: summed tap by tap, in Pillow's order (NumPy's sum would pair them)
    for tap in range(taps):
        total = total + w[:, tap]
    w = np.where(total[:, None] != 0.0, w / np.where(total != 0.0, total, 1.0)[:, None], w)
    # To fixed point, rounding half away from zero.
    fixed = np.trunc(w * (1 << PRECISION_BITS) + np.where(w < 0, -0.5, 0.5)).astype(np.int64)
    return first, fixed


def _resample_rows(src: np.ndarray, out_size: int, resample: int) -> np.ndarray:
    """Resample ``src [N, M, C] uint8`` along its first axis to ``[out_size, M, C] uint8``.

    Output rows are made a block at a time, so the int64 sums never exceed ~32 MB whatever
    the image size.
    """
    n, m, c = src.shape
    first, weights = resample_weights(n, out_size, resample)  # [out], [out, taps]
    out = np.empty((out_size, m, c), np.uint8)
    block = max(1, (1 << 22) // max(1, m * c))  # rows per block: 4M int64 sums
    for start in range(0, out_size, block):
        rows = slice(start, min(start + block, out_size))
        acc = np.full((rows.stop - rows.start, m, c), 1 << (PRECISION_BITS - 1), np.int64)  # [b, M, C]
        for tap in range(weights.shape[1]):
            w = weights[rows, tap]  # [b]
            if not w.any():
                continue
            index = np.minimum(first[rows] + tap, n - 1)  # a zero weight may point past the edge
            acc += src[index].astype(np.int64) * w[:, None, None]
        out[rows] = np.clip(acc >> PRECISION_BITS, 0, 255)
    return out


def resize(image: np.ndarray, height: int, width: int, resample: int = BICUBIC) -> np.ndarray:
    """``[H, W, 3] uint8`` → ``[height, width, 3] uint8``: Pillow's ``Image.resize``, the reference's own call.

    Where Pillow is installed it does the work (8000 × 6000 to 4704 × 3520: 0.6 s, against 6.4 s for
    the NumPy twin); without it, :func:`resize_numpy` gives the same pixels.
    """
    try:
        import PIL.Image
    except ImportError:
        return resize_numpy(image, height, width, resample)
    if (image.shape[0], image.shape[1]) == (height, width):
        return image
    return np.array(PIL.Image.fromarray(image).resize((width, height), resample=resample))


def resize_numpy(image: np.ndarray, height: int, width: int, resample: int = BICUBIC) -> np.ndarray:
    """Pillow's ``Image.resize`` of ``[H, W, 3] uint8`` to ``[height, width, 3]``, in NumPy, bit for bit.

    Two passes, one per axis, each a weighted sum of neighbouring pixels in Pillow's fixed-point
    arithmetic (:func:`resample_weights`). Each pass rounds and clips to 8 bits, so the order of
    the passes shows in the result, and it is the installed Pillow's (see
    :func:`vertical_pass_first`): the reference preprocessor resizes with whichever Pillow is there.
    """
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image

    def horizontal(x):  # columns are the rows of the transposed image
        return x if x.shape[1] == width else _resample_rows(x.transpose(1, 0, 2), width, resample).transpose(1, 0, 2)

    def vertical(x):
        return x if x.shape[0] == height else _resample_rows(x, height, resample)

    if vertical_pass_first(h, w, height, width):
        image = horizontal(vertical(image))
    else:
        image = vertical(horizontal(image))
    return np.ascontiguousarray(image)


def vertical_pass_first(h: int, w: int, height: int, width: int) -> bool:
    """Whether Pillow resizes an h × w image to height × width by its height first.

    Pillow 13 does exactly when the height shrinks and ``2·width − height`` grows; Pillow 12
    and older always go horizontal first (each rule held bit for bit over ~1,000 random sizes
    and filters against Pillow 13.0.0 and 12.3.0). Without Pillow installed, Pillow 13's rule.
    """
    if pillow_major_version() < 13:
        return False
    return height < h and 2 * width - height > 2 * w - h


@functools.cache
def pillow_major_version() -> int:
    """The installed Pillow's major version (read from its package metadata, not imported); 13 without one."""
    try:
        return int(importlib.metadata.version("pillow").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 13


# ==================================================================== 4–5. values and patches


def normalize(image: np.ndarray, config: PreprocessorConfig) -> np.ndarray:
    """``[H, W, 3] uint8`` → ``[3, H, W] float32``: rescaled and normalised in the reference's precision."""
    x = image.transpose(2, 0, 1)  # [3, H, W]: channels first, as the patches are laid out
    if config.do_rescale:
        x = (x.astype(np.float64) * config.rescale_factor).astype(np.float32)  # the reference rescales in float64
    x = x.astype(np.float32)
    if config.do_normalize:
        mean = np.array(config.image_mean, np.float32)[:, None, None]  # [3, 1, 1]
        std = np.array(config.image_std, np.float32)[:, None, None]
        x = (x - mean) / std
    return x


def patchify(image: np.ndarray, config: PreprocessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``[C, H, W] float32`` → ``pixel_values [gh·gw, C·T·P·P]`` and ``grid_thw (1, gh, gw)``.

    Rows run over merge blocks: the ``merge²`` patches one merged token will fuse are
    consecutive. Each patch is repeated over the T frames of a temporal patch.
    """
    c, h, w = image.shape
    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    gh, gw = h // p, w // p  # patches down and across
    x = image.reshape(c, gh // m, m, p, gw // m, m, p)  # [C, gh/m, m, P, gw/m, m, P]
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, P, P]: merge blocks outermost
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # [gh/m, gw/m, m, m, C, T, P, P]
    return x.reshape(gh * gw, c * t * p * p), (1, gh, gw)


# Beyond this many pixels an image is refused before it is resized: 2²⁸ (16× the pixel budget
# of Qwen3.5's own preprocessor config) is 3 GB as float32 RGB (twice that as pixel_values,
# each patch repeated over 2 frames) and 1M patches — 256k tokens at patch 16, merge 2, a whole
# native context — so a bigger target can only be a mistake in the config or the image.
MAX_PIXELS = 1 << 28


def target_size(height: int, width: int, config: PreprocessorConfig) -> tuple[int, int]:
    """The (height, width) :func:`preprocess` brings an image to — or the error it would raise."""
    if config.do_resize:
        h, w = smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)
        if h * w > MAX_PIXELS:
            raise MinqwenError(
                f"{config.source}: its pixel budget (min_pixels {config.min_pixels}, max_pixels "
                f"{config.max_pixels}) would resize a {width}×{height} image to {w}×{h} pixels, more than "
                f"minqwen allocates for one image ({MAX_PIXELS})"
            )
        return h, w
    if height * width > MAX_PIXELS:
        raise MinqwenError(f"the image is {width}×{height} pixels, more than minqwen allocates for one image "
                           f"({MAX_PIXELS}); do_resize is false in {config.source}, so it would not be shrunk")
    if height % config.factor or width % config.factor:
        raise MinqwenError(
            f"{config.source}: do_resize is false, but the image's {width}×{height} pixels are not multiples "
            f"of patch_size × merge_size = {config.factor}"
        )
    return height, width


def image_list(images) -> list:
    """``images`` as a list, refusing one image passed where a list of them is expected."""
    one_image = isinstance(images, (str, Path, np.ndarray)) or type(images).__module__.startswith("PIL.")
    if one_image or not isinstance(images, Iterable) or isinstance(images, (bytes, dict)):  # None is not Iterable
        raise MinqwenError(f"images must be a list of images (paths, Pillow images or arrays), got "
                           f"{type(images).__name__}" + (": wrap a single image in a list" if one_image else ""))
    return list(images)


def preprocess(image, config: PreprocessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """One image → ``pixel_values [patches, C·T·P·P] float32`` and ``grid_thw [1, 3] int64``.

    ``image``: a file path, a Pillow image, or a NumPy array ``[H, W, 3] uint8``.
    """
    rgb = read_image(image)
    try:
        height, width = target_size(rgb.shape[0], rgb.shape[1], config)
    except MinqwenError as e:
        if isinstance(image, (str, Path)):  # say which file it was
            raise MinqwenError(f"{image}: {e}") from None
        raise
    if config.do_resize:
        rgb = resize(rgb, height, width, config.resample)
    pixel_values, grid = patchify(normalize(rgb, config), config)
    return pixel_values, np.array([grid], np.int64)


def preprocess_images(images, config: PreprocessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Several images → their pixel_values stacked ``[Σ patches, C·T·P·P]`` and ``grid_thw [n, 3]``."""
    images = image_list(images)
    if not images:
        raise MinqwenError("no images given")
    results = [preprocess(image, config) for image in images]
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])
