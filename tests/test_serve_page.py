"""The chat page in a real headless browser: Debian's chromium driven by Playwright (no browser download)."""
import os
import shutil

import pytest
from PIL import Image

from serving import Running, script_sampler

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    from glm4v_ms import demo
    d = demo.build(str(tmp_path_factory.mktemp("page") / "tiny"), "demo-tiny", seed=4)
    s = Running(["--model", d, "--max-num-seqs", "2", "--max-model-len", "2048", "--served-model-name", "glm-tiny"])
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium executable (CI installs Debian's chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def test_upload_ask_stream_and_box(srv, browser, tmp_path, monkeypatch):
    script_sampler(monkeypatch, srv.state.processor.tokenizer,
                   "<think>Let me think about this step by step.</think><answer>The cat is "
                   "<|begin_of_box|>[250,200,750,800]<|end_of_box|> here.</answer>")
    img = tmp_path / "cat.png"
    Image.new("RGB", (200, 100), (255, 255, 255)).save(img)
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(srv.url + "/")
    assert page.text_content("#model") == "glm-tiny"
    page.set_input_files("#files", str(img))
    page.wait_for_selector("#media canvas")
    # count the answer's updates: a streamed answer grows in several steps
    page.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++)
                     .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#prompt", "Where is the cat?")
    page.click("#send")
    page.wait_for_selector(".turn[data-finish='stop']", timeout=60_000)
    assert page.text_content(".answer") == "The cat is [250,200,750,800] here."
    assert page.evaluate("window.updates") > 5
    details = page.locator(".turn details")
    assert details.is_visible() and details.get_attribute("open") is None      # the thinking is folded away
    assert "Let me think about this step by step." in details.text_content()
    page.wait_for_selector("#media canvas[data-boxes='1']")
    px = page.evaluate("""([x, y]) => Array.from(document.querySelector('#media canvas').getContext('2d')
                          .getImageData(x, y, 1, 1).data)""", [50, 50])     # on the box's left edge (x = 250/1000 * 200)
    inside = page.evaluate("""() => Array.from(document.querySelector('#media canvas').getContext('2d')
                              .getImageData(100, 50, 1, 1).data)""")
    assert px[:3] == [255, 0, 0] and inside[:3] == [255, 255, 255]
    assert not errors


def test_pdf_pages_become_images(srv, browser, tmp_path):
    pdf = tmp_path / "doc.pdf"
    pages = [Image.new("RGB", (300, 400), c) for c in ((255, 0, 0), (0, 0, 255))]
    pages[0].save(pdf, save_all=True, append_images=pages[1:])
    page = browser.new_page()
    page.goto(srv.url + "/")
    page.set_input_files("#files", str(pdf))
    page.wait_for_function("document.querySelectorAll('#media canvas').length === 2")
    assert page.text_content("#status") == "2 page(s)"
    page.fill("#prompt", "Summarise.")
    page.click("#send")
    page.wait_for_selector(".turn[data-finish]", timeout=60_000)
    assert not page.locator(".turn .error").count()
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"%PDF-1.4 not really")
    page.set_input_files("#files", str(bad))
    page.wait_for_function("document.getElementById('status').textContent.includes('not a readable PDF')")
    assert os.path.getsize(pdf) > 0
