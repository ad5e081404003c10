"""http(s) downloads for images and videos: a timeout and a size cap, nothing else (standard library only)."""
from __future__ import annotations

import re
import urllib.error
import urllib.request

from .errors import ProcessorError

TIMEOUT_S = 30.0
MAX_BYTES = 512 * 1024 * 1024  # a 5-minute video at a high bitrate fits; a runaway stream does not


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def check_scheme(source, kind):
    """Refuse a URL whose scheme we cannot fetch (ftp://, s3://, ...) with that reason, rather than let it be
    looked up as a file name and reported missing."""
    match = _SCHEME.match(source)
    if match and match.group(1).lower() not in ("http", "https", "file"):
        raise ProcessorError(f"unsupported URL scheme '{match.group(1)}' for {kind} {source}: "
                             "use http(s)://, file:// or a local path")


def fetch_bytes(url, timeout=TIMEOUT_S, max_bytes=MAX_BYTES):
    """GET `url` -> its body. ProcessorError on a bad status, a timeout or a body over `max_bytes`."""
    if not url.startswith(("http://", "https://")):
        raise ProcessorError(f"not an http(s) URL: {url}")
    request = urllib.request.Request(url, headers={"User-Agent": "glm4v-ms"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ProcessorError(f"{url} is {int(length)} bytes, over the {max_bytes}-byte limit")
            chunks, size = [], 0
            while True:  # read in chunks: the header may be missing or lie
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise ProcessorError(f"{url} is over the {max_bytes}-byte limit")
                chunks.append(chunk)
            return b"".join(chunks)
    except ProcessorError:
        raise
    except urllib.error.HTTPError as e:
        raise ProcessorError(f"cannot fetch {url}: HTTP {e.code}") from None
    except (TimeoutError, OSError) as e:  # URLError and socket.timeout are OSErrors
        reason = getattr(e, "reason", e)
        raise ProcessorError(f"cannot fetch {url}: {reason or 'timed out'}") from None
