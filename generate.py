#!/usr/bin/env python
"""Chat with GLM-4.1V-9B-Thinking or GLM-4.5V (MindSpore; Ascend when present, else CPU).

  python generate.py --model_name DIR --image cat.jpg --prompt "Describe this image."
  python generate.py --model_name DIR --video clip.mp4 --prompt "What happens?" --max_thinking_tokens 2048
  python generate.py --model_name DIR --image a.png --image b.png --chat        # multi-turn, prompts from stdin
  python generate.py --model_name demo-tiny --image cat.jpg --prompt "Hi"       # random tiny model, any machine

On several cards, one process per card started by MindSpore's launcher (rank 0 prints, the others are silent):
  msrun --worker_num=4 --local_worker_num=4 --master_port=8118 --join=True \
        generate.py --model_name GLM-4.5V --tensor_parallel_size 4 [--expert_parallel] --image cat.jpg --prompt "Hi"

Tokens stream to stdout as they are made (the thinking dimmed, or hidden with --hide_thinking); the last line on
stderr gives prompt tokens, new tokens, prefill time and decode speed.
"""
import argparse
import os
import re
import sys

DEMOS = ("demo-tiny", "demo-150m")
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
TAG_RE = re.compile("(" + "|".join(re.escape(t) for t in TAGS) + ")")
CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")   # all but tab and newline: shown escaped


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        sys.stderr.write(f"generate.py: error: {message}\n")
        sys.exit(2)


def _bool(v):
    low = v.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def parse(argv):
    p = Parser(description="Chat with GLM-4.1V-9B-Thinking in MindSpore.")
    p.add_argument("--model_name", required=True,
                   help="checkpoint folder (HF or converted), hub id, or a random demo checkpoint: " + " or ".join(DEMOS))
    p.add_argument("--image", action="append", default=[], help="image path or URL (repeatable)")
    p.add_argument("--video", help="video path or URL")
    p.add_argument("--prompt", help="the user's message (with --chat: the first one)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--chat", action="store_true", help="multi-turn: read further prompts from stdin")
    p.add_argument("--max_new_tokens", type=int, help="default: generation_config.json's, else 8192")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top_p", type=float)
    p.add_argument("--top_k", type=int)
    p.add_argument("--repetition_penalty", type=float)
    p.add_argument("--max_thinking_tokens", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--greedy", action="store_true", help="no sampling, whatever generation_config.json says")
    p.add_argument("--device", choices=["auto", "cpu", "ascend"], default=None)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    p.add_argument("--hide_thinking", action="store_true", help="show only the answer")
    p.add_argument("--boxes", metavar="OUT.png", help="write the (last) image with the answer's grounding boxes drawn")
    p.add_argument("--enable_thinking", type=_bool, default=None, metavar="true|false",
                   help="passed to the chat template (GLM-4.5V thinks unless false; GLM-4.1V's template ignores it)")
    p.add_argument("--tensor_parallel_size", type=int, default=1, help="ranks of this msrun launch (default 1)")
    p.add_argument("--expert_parallel", action="store_true", help="whole experts per rank instead of split experts")
    p.add_argument("--no_compile_cache", action="store_true",
                   help="do not keep compiled graphs for the next run (default: kept in $GLM4V_MS_COMPILE_CACHE, "
                        "else ~/.cache/glm4v_ms/compile; a second run of the same command then compiles nothing)")
    a = p.parse_args(argv)
    if not a.chat and not a.prompt:
        p.error("--prompt is required (or use --chat)")
    if a.tensor_parallel_size < 1:
        p.error(f"--tensor_parallel_size must be >= 1, got {a.tensor_parallel_size}")
    if a.image and a.video:
        p.error("give images or a video, not both (the model was not trained on the mix)")
    if a.boxes and not a.image:
        p.error("--boxes needs an --image to draw on")
    if a.boxes and os.path.splitext(a.boxes)[1].lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        p.error("--boxes: the output must be a .png, .jpg or .webp file")
    return a


def resolve_model(name):
    from glm4v_ms import demo
    if name in DEMOS:
        folder = demo.cached(name)
        print(f"[{name}: a random checkpoint in {folder}: its weights are random, its output is noise]", file=sys.stderr)
        return folder
    if os.path.isdir(name):
        return name
    if name.count("/") == 1 and not os.path.exists(name):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise SystemExit(f"error: {name} is not a local folder, and huggingface_hub is not installed to download it")
        try:
            return snapshot_download(name)
        except Exception as e:  # network, auth, missing repo: one line whatever the cause
            raise SystemExit(f"error: could not download {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    raise SystemExit(f"error: model folder not found: {name}")


class Display:
    """Streams the decoded text of row 0 with the tags replaced by headers: the thinking (dimmed on a terminal,
    or hidden), then the answer."""

    def __init__(self, tokenizer, hide_thinking, out=sys.stdout):
        self.tok, self.hide, self.out = tokenizer, hide_thinking, out
        self.dim = out.isatty()
        self.ids, self.done, self.thinking = [], 0, False

    def put(self, tokens):
        self.ids.append(int(tokens[0]))
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        end = len(text.rstrip("\ufffd"))           # an incomplete UTF-8 sequence: wait for its next token
        lt = text.rfind("<", self.done, end)
        if lt >= 0 and any(t.startswith(text[lt:end]) and t != text[lt:end] for t in TAGS):
            end = lt                                # maybe the start of a tag: wait too
        self._show(text[self.done:end])
        self.done = max(self.done, end)

    def end(self):
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        self._show(text[self.done:] + "\n")

    def _show(self, chunk):
        for part in TAG_RE.split(chunk):
            if part in ("<think>", "</think>"):
                self.thinking = part == "<think>"
                self._write("Thinking: " if self.thinking else "\n", header=True)
            elif part == "<answer>":
                self._write("Answer: ", header=True)
            elif part != "</answer>":
                self._write(part)

    def _write(self, s, header=False):
        if not s or (self.hide and (self.thinking or s == "\n" and header)):
            return
        if not header:   # the model's text: a raw escape or carriage return would act on the terminal
            s = CONTROL_RE.sub(lambda m: m.group().encode("unicode_escape").decode(), s)
        if self.thinking and self.dim and not header:
            s = f"\033[2m{s}\033[0m"
        self.out.write(s)
        self.out.flush()


def write_boxes(source, answer, out):
    """The answer's <|begin_of_box|>[x1,y1,x2,y2]<|end_of_box|> (0-1000 of each side) drawn on the original image."""
    from glm4v_ms.processing.boxes import draw_boxes, parse_boxes
    from glm4v_ms.processing.image import open_image
    image = open_image(source)
    boxes = parse_boxes(answer, *image.size)
    tmp = out + ".part" + os.path.splitext(out)[1]
    draw_boxes(image, boxes).save(tmp)   # then renamed: never a half-written file under the asked name
    os.replace(tmp, out)
    for b in boxes:
        print(f"box {b['box']} (relative {b['relative']})", file=sys.stderr)
    print(f"[{len(boxes)} box(es) drawn on {out}]", file=sys.stderr)


def media_items(a):
    """The chat template's media entries; a path that is not a file or a URL we cannot fetch fails here, before
    the model loads (a typo should not cost a full load)."""
    from glm4v_ms.processing.image import open_image

    items = []
    for kind, src in [("image", p) for p in a.image] + ([("video", a.video)] if a.video else []):
        if "://" in src:
            scheme = src.split("://", 1)[0].lower()
            if scheme not in ("http", "https", "file"):
                raise ValueError(f"{kind} {src}: {scheme}:// URLs are not supported (use http(s)://, file:// or a path)")
            if scheme == "file":
                src = src[len("file://"):]
        if "://" not in src and not os.path.isfile(src):
            raise ValueError(f"{kind} not found: {src}" + (" (a folder)" if os.path.isdir(src) else ""))
        if kind == "image" and "://" not in src:
            open_image(src)   # decodes it: a broken file fails now
        items.append({"type": kind, "url" if "://" in src else "path": src})
    return items


def run(a):
    from glm4v_ms import AutoModelForImageTextToText, Glm4vProcessor
    from glm4v_ms.processing import strip_thinking

    folder = resolve_model(a.model_name)
    processor = Glm4vProcessor.from_pretrained(folder)
    media = media_items(a)
    template_kw = {} if a.enable_thinking is None else {"enable_thinking": a.enable_thinking}
    messages = [{"role": "system", "content": a.system}] if a.system else []

    def turn(prompt, first):
        content = (media if first else []) + [{"type": "text", "text": prompt}]
        msgs = messages + [{"role": "user", "content": content}]
        return msgs, processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                   **template_kw)

    # the first turn's prompt (media decoded) is built before the model loads: bad media fail fast
    pending = turn(a.prompt, True) if a.prompt else None
    model = AutoModelForImageTextToText.from_pretrained(
        folder, dtype=a.dtype, device=None if a.device in (None, "auto") else a.device,
        tensor_parallel_size=a.tensor_parallel_size, expert_parallel=a.expert_parallel)
    gen = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
               repetition_penalty=a.repetition_penalty, max_thinking_tokens=a.max_thinking_tokens, seed=a.seed)
    if a.greedy:
        gen["do_sample"] = False
    elif any(v is not None for v in (a.temperature, a.top_p, a.top_k)):
        gen["do_sample"] = True
    cfg = model.generation_config.updated(**gen)   # validates the flags before any work
    ctx = model.config.text.max_position_embeddings
    print(f"[memory: {model.memory_plan()}]", file=sys.stderr)

    from glm4v_ms import PromptCache
    # --chat: each turn reuses the KV cache of what it shares with the last one (the image is not encoded again)
    cache = PromptCache() if a.chat and model.layout.world == 1 else None
    first = True
    while True:
        if pending is None:
            if sys.stdin.isatty():
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line or not line.strip():
                return 0
            pending = turn(line.strip(), first)
        msgs, inputs = pending
        pending = None
        n_prompt = inputs["input_ids"].shape[1]
        if n_prompt >= ctx and a.chat:
            # the session goes on: this turn is dropped, the conversation so far is kept
            print(f"this turn does not fit: the conversation would have {n_prompt} tokens; the model's context is "
                  f"{ctx}. Send a shorter message.", file=sys.stderr)
            continue
        if n_prompt < ctx and n_prompt + cfg.max_new_tokens > ctx:
            print(f"note: max_new_tokens {cfg.max_new_tokens} is cut to {ctx - n_prompt}: the prompt has {n_prompt} "
                  f"tokens of the model's {ctx}-token context", file=sys.stderr)
        display = Display(processor.tokenizer, a.hide_thinking)
        out = model.generate(**inputs, streamer=display, past_key_values=cache, return_dict_in_generate=True, **gen)
        ids, t = out.sequences, out.timings
        tps = t["decode_steps"] / t["decode_s"] if t["decode_s"] > 0 else 0.0
        note = f" (first step {t['first_step_s']:.2f} s)" if "first_step_s" in t else ""
        reused = f", reused from the last turn: {t['reused_tokens']} tokens" if t.get("reused_tokens") else ""
        print(f"prompt tokens: {t['prompt_tokens']}, new tokens: {t['new_tokens']}, prefill: {t['prefill_s']:.2f} s, "
              f"decode: {tps:.1f} tokens/s{note}{reused}", file=sys.stderr)
        reply = processor.decode(ids[0, n_prompt:], skip_special_tokens=True)
        # earlier assistant turns keep only their answer, as the official CLI does; media stay in the first turn
        messages[:] = msgs + [{"role": "assistant", "content": strip_thinking(reply)}]
        if a.boxes:
            write_boxes(a.image[-1], strip_thinking(reply), a.boxes)
        first = False
        if not a.chat:
            return 0


def exit_on_interrupt():
    """Ctrl-C anywhere (import, load, prefill, decode, reading stdin): `interrupted` on stderr, exit 130.

    MindSpore installs its own SIGINT handling (it ends the process with SIGTERM, or, during its import, aborts
    with a flood of errors), so no Python handler can be relied on: SIGINT is blocked in this thread before
    anything starts a thread (every thread inherits the mask) and a watcher thread takes it with sigwait."""
    import signal
    import threading
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def watch():
        signal.sigwait({signal.SIGINT})
        os.write(2, b"\ninterrupted\n")
        os._exit(130)   # no interpreter teardown: MindSpore's threads may be mid-kernel
    threading.Thread(target=watch, name="sigint", daemon=True).start()


def main(argv=None):
    if argv is None:   # the CLI, not a caller's process
        exit_on_interrupt()
    from glm4v_ms.parallel import rank   # no MindSpore import: the SIGINT mask above is set before any thread
    if rank() != 0:   # under msrun: rank 0 speaks for all, the others only compute (their exit code still counts)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
    a = parse(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("GLOG_v", "3")   # MindSpore's own log: errors only
    import warnings   # the package's warnings (compile cache off, GPTQ layers in float) as one line each
    warnings.formatwarning = lambda message, *_, **__: f"note: {message}\n"
    from glm4v_ms import compile_cache
    if a.no_compile_cache:
        os.environ[compile_cache.ENV] = "off"
    else:
        os.environ.setdefault(compile_cache.ENV, compile_cache.DEFAULT_DIR)
    try:
        return run(a)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:   # ours are ValueErrors; RuntimeError: MindSpore's own
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
