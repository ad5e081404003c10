"""Bad input gives one ProcessorError naming the file or the reason; http(s) loading with timeout and size cap."""
import http.server
import os
import threading
import time

import numpy as np
import pytest

from glm4v_ms.processing import Glm4vProcessor, ProcessorError
from glm4v_ms.processing.fetch import fetch_bytes
from processing_fixtures import *  # noqa: F401,F403
from processing_fixtures import drawn_image, encode_clip


def _chat(*items):
    return [{"role": "user", "content": list(items) + [{"type": "text", "text": "What is this?"}]}]


def _run(processor, chat):
    return processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "garbage.png").write_bytes(b"\x89PNG not really a png" * 10)
    (d / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    clip = bytearray(open(encode_clip(d / "tmp.mp4", 1.0, 4, (56, 56)), "rb").read())
    at = clip.find(b"mdat")  # keep the container, zero every frame's data: nothing decodes
    size = int.from_bytes(clip[at - 4:at], "big")
    clip[at + 4:at - 4 + size] = bytes(size - 8)
    (d / "no_frames.mp4").write_bytes(bytes(clip))
    drawn_image(2010, 10, 1).save(d / "too_wide.png")  # 201:1
    drawn_image(2000, 10, 1).save(d / "just_ok.png")   # 200:1 is allowed
    encode_clip(d / "ok.mp4", 1.0, 4, (56, 56))
    return d


def test_processor_error_is_a_value_error():
    assert issubclass(ProcessorError, ValueError)


@pytest.mark.parametrize("item, words", [
    ({"type": "image", "path": "/nonexistent/cat.jpg"}, ["/nonexistent/cat.jpg", "not found"]),
    ({"type": "image", "path": "{d}/garbage.png"}, ["garbage.png", "cannot read image"]),
    ({"type": "video", "path": "/nonexistent/clip.mp4"}, ["/nonexistent/clip.mp4", "not found"]),
    ({"type": "video", "path": "{d}/garbage.mp4"}, ["garbage.mp4"]),
    ({"type": "video", "path": "{d}/no_frames.mp4"}, ["no_frames.mp4", "no decodable frame"]),
    ({"type": "image", "path": "{d}/too_wide.png"}, ["aspect ratio", "200"]),
    ({"type": "image"}, ["no 'image'"]),
])
def test_bad_input_names_the_file_or_reason(item, words, ours, bad_files):
    item = {k: v.format(d=bad_files) if isinstance(v, str) else v for k, v in item.items()}
    with pytest.raises(ProcessorError) as e:
        _run(ours, _chat(item))
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message


def test_aspect_ratio_200_is_allowed(ours, bad_files):
    out = _run(ours, _chat({"type": "image", "path": f"{bad_files}/just_ok.png"}))
    _, gh, gw = out["image_grid_thw"][0]
    assert gw / gh >= 50


def test_image_and_video_in_one_chat(ours, bad_files):
    chat = _chat({"type": "image", "path": f"{bad_files}/just_ok.png"}, {"type": "video", "path": f"{bad_files}/ok.mp4"})
    with pytest.raises(ProcessorError, match="both an image and a video"):
        _run(ours, chat)


def test_placeholder_count_mismatch(ours):
    with pytest.raises(ProcessorError, match="placeholders"):
        ours(text="<|image|><|image|>", images=[drawn_image(40, 40)])


def test_missing_model_folder():
    with pytest.raises(ProcessorError, match="not found"):
        Glm4vProcessor.from_pretrained("/nonexistent/model")


# --- URLs -----------------------------------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    files = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/slow":
            time.sleep(2.0)
        if self.path == "/stream":  # no Content-Length: the cap must hold while reading
            self.send_response(200)
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"x" * 4096)
            return
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server(media_dir, bad_files):
    with open(os.path.join(media_dir, "640x480.png"), "rb") as f:
        _Handler.files["/cat.png"] = f.read()
    with open(os.path.join(bad_files, "ok.mp4"), "rb") as f:
        _Handler.files["/clip.mp4"] = f.read()
    _Handler.files["/big"] = b"y" * 300_000
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_image_url_equals_local_file(ours, server, media_dir):
    by_url = _run(ours, _chat({"type": "image", "url": f"{server}/cat.png"}))
    by_path = _run(ours, _chat({"type": "image", "path": os.path.join(media_dir, "640x480.png")}))
    np.testing.assert_array_equal(by_url["input_ids"], by_path["input_ids"])
    np.testing.assert_array_equal(by_url["pixel_values"], by_path["pixel_values"])


def test_video_url_equals_local_file(ours, server, bad_files):
    by_url = _run(ours, _chat({"type": "video", "url": f"{server}/clip.mp4"}))
    by_path = _run(ours, _chat({"type": "video", "path": f"{bad_files}/ok.mp4"}))
    np.testing.assert_array_equal(by_url["input_ids"], by_path["input_ids"])
    np.testing.assert_array_equal(by_url["pixel_values_videos"], by_path["pixel_values_videos"])


def test_url_timeout(server):
    start = time.monotonic()
    with pytest.raises(ProcessorError, match="cannot fetch .*/slow"):
        fetch_bytes(f"{server}/slow", timeout=0.3)
    assert time.monotonic() - start < 1.5


def test_url_size_cap(server, model_dir):
    with pytest.raises(ProcessorError, match="over the 100000-byte limit"):
        fetch_bytes(f"{server}/big", max_bytes=100_000)           # Content-Length says too big
    with pytest.raises(ProcessorError, match="over the 100000-byte limit"):
        fetch_bytes(f"{server}/stream", max_bytes=100_000)        # no length: counted while reading
    assert len(fetch_bytes(f"{server}/big", max_bytes=300_000)) == 300_000
    capped = Glm4vProcessor.from_pretrained(model_dir, max_download_bytes=1000)
    with pytest.raises(ProcessorError, match="limit"):
        _run(capped, _chat({"type": "image", "url": f"{server}/cat.png"}))


def test_url_not_found(server):
    with pytest.raises(ProcessorError, match="404"):
        fetch_bytes(f"{server}/missing.png")
