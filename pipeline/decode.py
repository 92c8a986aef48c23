"""CPU stage before the model: image bytes -> RGB image -> processor tensors (resize, normalise, tokenise).

It runs as ordinary Ray tasks upstream of the actor pool, so a model actor only pads and stacks ready tensors.
A row that cannot be opened or processed leaves this stage with `error` set and no tensors; odd but readable
images (CMYK, 16-bit, alpha, palette, 1x1, animated) are converted to plain RGB and go on.
"""
from __future__ import annotations

import functools
import io
import re
import warnings

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from pipeline.bundled import resolve_model
from pipeline.config import JobConfig
from pipeline.schema import PREPARED_SCHEMA

MEMORY_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # "<_io.BytesIO object at 0x7f62...>" -> "<_io.BytesIO object>"

class ImageRejected(ValueError):
    """An image that is refused on purpose (too many pixels); the message is the row's whole error text."""


JPEG_SCALES = (1, 2, 4, 8)  # the reductions libjpeg applies while decoding (Image.draft)


def to_rgb(data: bytes, max_pixels: int) -> Image.Image:
    """Encoded image -> RGB, never holding more than `max_pixels` decoded pixels: the size comes from the header
    (Image.open reads nothing else), a JPEG above the bound is decoded at the smallest reduction that fits, any
    other image above it is rejected before decoding. Raises ImageRejected, or whatever PIL raises for bytes
    nothing can open (or a truncated file)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the bound below is far stricter
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                _reduce_jpeg(image, max_pixels)
            if image.size[0] * image.size[1] > max_pixels:
                raise ImageRejected(f"image too large: {width}x{height} = {width * height / 1e6:.1f} M pixels, "
                                    f"above --max-image-pixels {max_pixels}")
            image.seek(0)  # animated GIF / WebP / multi-page TIFF: the first frame
            image.load()
            return _as_rgb(image)


def _reduce_jpeg(image: Image.Image, max_pixels: int) -> None:
    """Ask libjpeg for the mildest reduction that brings the image under `max_pixels` (no-op for other formats)."""
    if image.format != "JPEG":
        return
    width, height = image.size
    for scale in JPEG_SCALES:
        if -(-width // scale) * -(-height // scale) <= max_pixels:  # libjpeg rounds the reduced size up
            # draft picks the largest scale whose result is not below the size asked for: ask for the floor
            image.draft(image.mode, (max(1, width // scale), max(1, height // scale)))
            return


def error_text(e: Exception) -> str:
    """A row's error for a failed decode, the same on every run (PIL names the BytesIO object with its address, which
    would split one reason into as many groups as rows)."""
    if isinstance(e, ImageRejected):
        return str(e)
    if isinstance(e, UnidentifiedImageError):
        return "cannot decode image: not an image format PIL can read"
    if isinstance(e, Image.DecompressionBombError):
        return "cannot decode image: decompression bomb (PIL's own pixel limit)"
    return f"cannot decode image: {type(e).__name__}: {MEMORY_ADDRESS.sub('', str(e))}"


def _as_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16L", "I;16B", "I", "F"):
        # 16/32-bit greyscale: PIL's own RGB conversion clips to the low byte, so rescale 16-bit range to 8 bits.
        pixels = np.asarray(image, dtype=np.float64)
        scale = 257.0 if pixels.max() > 255 else 1.0
        return Image.fromarray(np.clip(pixels / scale, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels hold arbitrary colours; show them the way a viewer would: over white.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


@functools.cache
def load_processor(model: str):
    """The model's processor, once per worker process."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(resolve_model(model))
    processor.tokenizer.padding_side = "left"  # batched generation needs left padding
    return processor


def prompt_text(processor, instruction: str) -> str:
    """One user turn with the image and the instruction, in the model's own chat format."""
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    return processor.apply_chat_template(turn, add_generation_prompt=True)


def unknown_words(tokenizer, text: str) -> list[str]:
    """The pieces of `text` that the tokenizer can only map to its unknown token. Only word-level vocabularies
    (the bundled model's) have such pieces; byte-fallback tokenizers (LLaVA's) encode every text."""
    if tokenizer.unk_token_id is None:
        return []
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [text[start:end] for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"])
            if token == tokenizer.unk_token_id]


def pack(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob)) as arrays:
        return {name: arrays[name] for name in arrays.files}


def _prepare_row(processor, image_bytes: bytes, instruction: str, max_pixels: int) -> bytes:
    """Processor output for one row, without its batch dimension (input_ids [S], pixel_values [3, H, W] or
    [patches, 3, H, W] for AnyRes models, ...)."""
    image = to_rgb(image_bytes, max_pixels)
    arrays = processor(images=[image], text=[prompt_text(processor, instruction)], return_tensors="np")
    return pack({name: np.asarray(value)[0] for name, value in arrays.items()})


def prepare(batch: pa.Table, config: JobConfig) -> pa.Table:
    """SOURCE_SCHEMA rows -> PREPARED_SCHEMA rows (a Ray map_batches function)."""
    processor = load_processor(config.model)
    rows = batch.to_pylist()
    questions, errors, inputs = [], [], []
    for row in rows:
        question = (row["question"] or config.question) if config.task == "vqa" else None
        error, packed = row["error"], None
        unknown = unknown_words(processor.tokenizer, question) if error is None and question else []
        if unknown:  # the model would read <unk> in their place and answer another question
            error = f"question has words the model does not know: {', '.join(map(repr, unknown))}"
        if error is None:
            try:
                packed = _prepare_row(processor, row["image"], question or config.prompt, config.max_image_pixels)
            except Exception as e:  # noqa: BLE001 -- any failure on one row becomes that row's error, never the job's
                error = error_text(e)
        questions.append(question)
        errors.append(error)
        inputs.append(packed)
    return pa.table({"id": batch.column("id"), "shard": batch.column("shard"), "shard_rows": batch.column("shard_rows"),
                     "question": questions, "error": errors, "inputs": inputs}, schema=PREPARED_SCHEMA)
