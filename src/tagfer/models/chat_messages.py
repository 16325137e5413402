"""OpenAI-style chat messages: images as base64 ``data:`` URLs, user/system messages.

:func:`image_part` resizes an image (aspect preserved, longer side = ``side``, the paper's
224) with :func:`tagfer.models.vlm.resize_for_model` and embeds it as a ``data:`` URL;
:func:`chat_messages` is the one builder of a request's messages (backends, eval).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from PIL import Image

from tagfer.core.imageio import data_url, load_pil
from tagfer.models.vlm import resize_for_model  # light import (PIL only)

__all__ = ["encode_image", "image_part", "user_message", "system_message", "chat_messages"]


def _to_pil(image: Image.Image | str | os.PathLike | bytes, side: int | None = None) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image

    # Files are decoded at no more than twice the target side (JPEG draft mode for big photos);
    # the final resize to ``side`` is done by the caller.
    return load_pil(image, max_side=max(2 * side, 64) if side else 2048)


def encode_image(image: Image.Image | str | os.PathLike | bytes, side: int | None = 224, fmt: str = "png") -> str:
    """``data:image/<fmt>;base64,...`` URL of ``image`` resized to longer side ``side``
    (None keeps the size). Paths/bytes are read with :func:`tagfer.core.imageio.load_image`
    (so a corrupt file raises :class:`tagfer.core.imageio.ImageError`)."""
    pil = _to_pil(image, side)
    if side:
        pil = resize_for_model(pil, side)
    return data_url(pil, fmt)


def image_part(image: Image.Image | str | os.PathLike | bytes, side: int | None = 224, fmt: str = "png") -> dict[str, Any]:
    """OpenAI content part ``{"type": "image_url", "image_url": {"url": "data:..."}}``."""
    return {"type": "image_url", "image_url": {"url": encode_image(image, side, fmt)}}


def user_message(text: str, images: Sequence[Any] = (), side: int | None = 224, fmt: str = "png") -> dict[str, Any]:
    """A user message; images (PIL, path, bytes or ready content parts) come before the text."""
    if not images:
        return {"role": "user", "content": text}
    parts = [im if isinstance(im, dict) else image_part(im, side, fmt) for im in images]
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def system_message(text: str) -> dict[str, Any]:
    return {"role": "system", "content": text}


def chat_messages(user: str, images: Sequence[Any] = (), system: str | None = None, side: int | None = 224, fmt: str = "png") -> list[dict[str, Any]]:
    """The messages of one request: an optional system message, then :func:`user_message`
    (images before the text). The one builder of OpenAI-style chats (backends, eval)."""
    return ([system_message(system)] if system else []) + [user_message(user, images, side, fmt)]
