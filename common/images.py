"""Digit grids as PNG: float images in [0, 1] (or [-1, 1]) → one grayscale picture.

Used for the per-epoch training samples and by the client CLI (`generate`), so both look alike.
"""
from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image

from common import files


def to_uint8(images: np.ndarray, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Maps float images in `value_range` to uint8 [0, 255]; shape [N, H, W] or [N, H, W, 1] → [N, H, W]."""
    array = np.asarray(images, dtype=np.float32)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(f"expected images of shape [N, H, W] or [N, H, W, 1], got {array.shape}")
    low, high = value_range
    scaled = (np.nan_to_num(array, nan=low) - low) / (high - low)
    return np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)


def tile(images: np.ndarray, columns: int | None = None, padding: int = 2,
         value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Tiles N images into one uint8 [rows*(H+p)+p, cols*(W+p)+p] picture on a black background."""
    pixels = to_uint8(images, value_range)
    count, height, width = pixels.shape
    columns = columns or max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / columns))
    canvas = np.zeros((rows * (height + padding) + padding, columns * (width + padding) + padding), np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        canvas[top:top + height, left:left + width] = pixels[index]
    return canvas


def png_bytes(picture: np.ndarray, scale: int = 1) -> bytes:
    """Encodes a uint8 [H, W] picture as PNG, optionally enlarged `scale` times (nearest neighbour)."""
    image = Image.fromarray(picture, mode="L")
    if scale > 1:
        image = image.resize((picture.shape[1] * scale, picture.shape[0] * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_grid(path: str | os.PathLike, images: np.ndarray, columns: int | None = None,
              value_range: tuple[float, float] = (0.0, 1.0), scale: int = 2) -> None:
    """Writes `images` as one PNG grid at `path`, atomically."""
    files.write_bytes_atomic(path, png_bytes(tile(images, columns, value_range=value_range), scale))


def save_animation(path: str | os.PathLike, frame_paths: list[str | os.PathLike], frame_ms: int = 500) -> bool:
    """Writes the PNG pictures `frame_paths` (in order) as a looping GIF at `path`, atomically.

    The last frame is held three times as long, so a viewer sees where training ended. Returns
    False (and writes nothing) when there are no frames.
    """
    if not frame_paths:
        return False
    frames = [Image.open(frame_path).convert("L") for frame_path in frame_paths]
    durations = [frame_ms] * (len(frames) - 1) + [frame_ms * 3]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    files.write_bytes_atomic(path, buffer.getvalue())
    return True


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 8) -> np.ndarray:
    """Two uint8 pictures [H, W] next to each other with a mid-grey gap (for "real vs generated")."""
    height = max(left.shape[0], right.shape[0])
    canvas = np.full((height, left.shape[1] + gap + right.shape[1]), 128, np.uint8)
    canvas[:left.shape[0], :left.shape[1]] = left
    canvas[:right.shape[0], left.shape[1] + gap:] = right
    return canvas
