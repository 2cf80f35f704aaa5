"""Digit grids as PNG: float images in [0, 1] (or [-1, 1]) → one grayscale picture.

Used for the per-epoch training samples and by the client CLI (`generate`), so both look alike.
"""
from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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


HEADER_HEIGHT = 14  # rows above a labelled picture: PIL's default bitmap font is about 11 pixels high


def labelled_side_by_side(left: np.ndarray, right: np.ndarray, left_label: str, right_label: str,
                          gap: int = 8) -> np.ndarray:
    """`side_by_side` under a header row naming each half, e.g. "real" over the left one.

    Each half is widened (mid-grey) where its label is wider than it, so no label is cut.
    """
    font = ImageFont.load_default()
    widths = [max(picture.shape[1], _text_width(font, label) + 4) for picture, label in ((left, left_label), (right, right_label))]
    left, right = (_pad_width(picture, width) for picture, width in zip((left, right), widths))
    body = side_by_side(left, right, gap)
    header = Image.new("L", (body.shape[1], HEADER_HEIGHT), 0)
    draw = ImageDraw.Draw(header)
    for label, start, width in ((left_label, 0, widths[0]), (right_label, widths[0] + gap, widths[1])):
        draw.text((start + (width - _text_width(font, label)) // 2, 1), label, fill=255, font=font)
    return np.concatenate([np.asarray(header, np.uint8), body])


def _text_width(font, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return right - left


def _pad_width(picture: np.ndarray, width: int) -> np.ndarray:
    if picture.shape[1] >= width:
        return picture
    return np.pad(picture, ((0, 0), (0, width - picture.shape[1])), constant_values=128)


LABEL_HEIGHT = 12  # rows under each cell of a labelled grid, for one line of PIL's default font


def labelled_grid(images: np.ndarray, labels: list[str], columns: int = 8, scale: int = 3, padding: int = 2,
                  caption: str | None = None, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Images in a grid, each enlarged `scale` times (nearest neighbour) with its label centred on a
    strip under it, under an optional caption (lines split at "\\n"): uint8 [H, W] on a black background.

    Cell i (row i // columns, column i % columns) has its image at top = header + padding +
    row * (cell height + padding), left = padding + column * (size + padding), where size = H * scale and
    cell height = size + LABEL_HEIGHT; the header is HEADER_HEIGHT rows per caption line.
    """
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    pixels = to_uint8(images, value_range)
    count, height, width = pixels.shape
    size_y, size_x = height * scale, width * scale
    rows = max(1, math.ceil(count / columns))
    caption_lines = caption.split("\n") if caption else []
    header = HEADER_HEIGHT * len(caption_lines)
    canvas = Image.new("L", (columns * (size_x + padding) + padding,
                             header + rows * (size_y + LABEL_HEIGHT + padding) + padding), 0)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for line_number, line in enumerate(caption_lines):
        draw.text((padding, 1 + line_number * HEADER_HEIGHT), line, fill=255, font=font)
    for index in range(count):
        row, column = divmod(index, columns)
        top = header + padding + row * (size_y + LABEL_HEIGHT + padding)
        left = padding + column * (size_x + padding)
        cell = Image.fromarray(pixels[index], mode="L").resize((size_x, size_y), Image.NEAREST)
        canvas.paste(cell, (left, top))
        draw.text((left + (size_x - _text_width(font, labels[index])) // 2, top + size_y), labels[index], fill=255,
                  font=font)
    return np.asarray(canvas, np.uint8)
