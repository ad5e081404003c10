"""Media parts of an OpenAI chat request -> what the processor takes, with the server's limits.

image_url / video_url may be a `data:` URL (base64), an http(s) URL (fetched with a timeout and a size cap), or a
local path / file:// URL, allowed only under --allowed-local-media-path (as vLLM). Images are decoded here, so
that a bad one fails the request alone with a 400, and so that the original size is known for grounding boxes.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.parse

from ..processing.errors import ProcessorError
from ..processing.fetch import fetch_bytes


class MediaError(ValueError):
    def __init__(self, message, status=400, param=None):
        super().__init__(message)
        self.status, self.param = status, param


class MediaLoader:
    def __init__(self, allowed_local_path=None, max_bytes=32 << 20, image_timeout=5.0, video_timeout=30.0):
        self.allowed = os.path.realpath(allowed_local_path) if allowed_local_path else None
        self.max_bytes, self.image_timeout, self.video_timeout = max_bytes, image_timeout, video_timeout

    def _bytes(self, url: str, what: str, param: str) -> bytes | str:
        """The media's bytes, or the local path to read it from."""
        if url.startswith("data:"):
            head, sep, payload = url.partition(",")
            if not sep or ";base64" not in head:
                raise MediaError(f"{param}: a data URL must be base64 (data:<mime>;base64,<data>)", param=param)
            if len(payload) * 3 // 4 > self.max_bytes:
                raise MediaError(f"{param}: the {what} is over the {self.max_bytes}-byte limit", 413, param)
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise MediaError(f"{param}: the data URL is not valid base64", param=param) from None
        if url.startswith(("http://", "https://")):
            try:
                return fetch_bytes(url, self.image_timeout if what == "image" else self.video_timeout, self.max_bytes)
            except ProcessorError as e:
                raise MediaError(f"{param}: {e}", 413 if "limit" in str(e) else 400, param) from None
        path = urllib.parse.unquote(url[len("file://"):]) if url.startswith("file://") else url
        if "://" in path:
            raise MediaError(f"{param}: unsupported URL scheme (use data:, http(s):// or file://)", param=param)
        if self.allowed is None:
            raise MediaError(f"{param}: local files are not allowed (start the server with "
                             f"--allowed-local-media-path)", param=param)
        real = os.path.realpath(path)
        if os.path.commonpath([real, self.allowed]) != self.allowed:
            raise MediaError(f"{param}: {path} is outside the allowed media path", param=param)
        if not os.path.isfile(real):
            raise MediaError(f"{param}: file not found: {path}", param=param)
        if os.path.getsize(real) > self.max_bytes:
            raise MediaError(f"{param}: the {what} is over the {self.max_bytes}-byte limit", 413, param)
        return real

    def image(self, url: str, param: str):
        from PIL import Image, ImageOps
        src = self._bytes(url, "image", param)
        try:
            im = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
        except Exception:   # PIL raises many kinds for a bad file
            raise MediaError(f"{param}: the image does not decode", param=param) from None

    def video(self, url: str, param: str):
        return self._bytes(url, "video", param)


def pdf_pages(data: bytes, max_pages: int, longest: int = 1280) -> list:
    """A PDF's first max_pages pages as PNG data URLs, each at most `longest` pixels on its longer side
    (pypdfium2, an optional part of the serving extra)."""
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise MediaError("PDF upload needs pypdfium2 (pip install pypdfium2)", 501) from None
    try:
        doc = pdfium.PdfDocument(data)
    except Exception:   # pdfium's own error types differ by version
        raise MediaError("the file is not a readable PDF") from None
    try:
        if len(doc) > max_pages:
            raise MediaError(f"the PDF has {len(doc)} pages; at most {max_pages} (one image each) per request")
        out = []
        for i in range(len(doc)):
            page = doc[i]
            w, h = page.get_size()
            im = page.render(scale=min(2.0, longest / max(w, h, 1))).to_pil().convert("RGB")
            buf = io.BytesIO()
            im.save(buf, "PNG")
            out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
        return out
    finally:
        doc.close()
