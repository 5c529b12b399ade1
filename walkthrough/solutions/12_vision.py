"""Solutions to chapter 12's exercises. Run: python walkthrough/solutions/12_vision.py"""

import math
import sys
from pathlib import Path

from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # walkthrough/, for `course`
import course  # noqa: E402
from minqwen import vision  # noqa: E402

folder = course.ROOT / "tests" / "fixtures_vision" / "vision_fp32"
expected = load_file(str(folder / "expected.safetensors"))
tower = vision.load_vision(folder)
pre = tower.preprocessor


def resized(height, width, patch, merge, min_pixels, max_pixels):
    """The reference's smart_resize: sides on the patch × merge grid, area within the budget."""
    factor = patch * merge
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


# Exercise 12.1 ------------------------------------------------------------------------------
# Resize, count patches, divide by the merge square: each merge × merge square is one token.
def token_count(height, width, patch, merge, min_pixels, max_pixels):
    h, w = resized(height, width, patch, merge, min_pixels, max_pixels)
    return (h // patch) * (w // patch) // (merge * merge)


def exercise_12_1(height, width):
    return token_count(height, width, pre.patch_size, pre.merge_size, pre.min_pixels, pre.max_pixels)


sizes = [(4032, 3024), (2, 300), (7, 9), (2000, 2000)] + [expected[f"image.{i}"].shape[:2] for i in range(6)]
for size in sizes:
    assert exercise_12_1(*size) == tower.token_count(*size), size
photo = exercise_12_1(4032, 3024)
big = token_count(4032, 3024, 16, 2, 64 * 64, 4096 * 4096)
print(f"Exercise 12.1: the 4032×3024 photo becomes {photo} tokens with this tiny preprocessor "
      f"({resized(4032, 3024, pre.patch_size, pre.merge_size, pre.min_pixels, pre.max_pixels)} px); with patch 16, "
      f"merge 2 and 16.8 M pixels it is resized to {resized(4032, 3024, 16, 2, 64 * 64, 4096 * 4096)} px and "
      f"becomes {big:,} tokens — more than many whole conversations.")
assert big == (4032 // 16) * (3008 // 16) // 4  # 3024 / 32 = 94.5 rounds to 94 (half to even): 3008 px


# Exercise 12.2 ------------------------------------------------------------------------------
# Each image adds t·h·w / m² tokens but moves the position on by only max(h, w) / m (t = 1 for
# a still image). Text adds as many positions as tokens. So rope_delta = positions − tokens
# = Σ over images of (max(h, w) / m − t·h·w / m²).
def exercise_12_2():
    m = tower.config.spatial_merge_size
    return sum(int(max(h, w) // m - t * h * w // (m * m)) for t, h, w in expected["three_images.grid_thw"])


answer = exercise_12_2()
assert answer == expected["three_images.rope_delta"][0]
for t, h, w in expected["three_images.grid_thw"]:
    print(f"  image grid {t}×{h}×{w}: {t * h * w // 4} tokens, {max(h, w) // 2} positions")
print("Exercise 12.2: rope_delta =", answer, "— the reference's")
