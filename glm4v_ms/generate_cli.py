"""Chat with GLM-4.1V-9B-Thinking or GLM-4.5V (MindSpore; Ascend when present, else CPU): the CLI, run as
`python generate.py` (a shim at the repository root) or the installed `glm4v-ms-generate`.

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
import os
import re
import sys

from .faces import MODEL_HELP, MODELS, Parser, add_runtime_args, check_runtime_args, error_line, load_model, \
    resolve_model, setup_process, silence_other_ranks, true_or_false

CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")   # all but tab and newline: shown escaped


def parse(argv):
    p = Parser("generate.py", description=f"Chat with {MODELS} in MindSpore.")
    p.add_argument("--model_name", required=True, help=MODEL_HELP)
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
    p.add_argument("--hide_thinking", action="store_true", help="show only the answer")
    p.add_argument("--boxes", metavar="OUT.png", help="write the (last) image with the answer's grounding boxes drawn")
    p.add_argument("--enable_thinking", type=true_or_false, default=None, metavar="true|false",
                   help="passed to the chat template (GLM-4.5V thinks unless false; GLM-4.1V's template ignores it)")
    add_runtime_args(p)
    p.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter folder to apply (model.load_adapter)")
    p.add_argument("--no_compile_cache", action="store_true",
                   help="do not keep compiled graphs for the next run (default: kept in $GLM4V_MS_COMPILE_CACHE, "
                        "else ~/.cache/glm4v_ms/compile; a second run of the same command then compiles nothing)")
    a = p.parse_args(argv)
    if not a.chat and not a.prompt:
        p.error("--prompt is required (or use --chat)")
    check_runtime_args(p, a)
    if a.image and a.video:
        p.error("give images or a video, not both (the model was not trained on the mix)")
    if a.boxes and not a.image:
        p.error("--boxes needs an --image to draw on")
    if a.boxes and os.path.splitext(a.boxes)[1].lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        p.error("--boxes: the output must be a .png, .jpg or .webp file")
    return a


class Display:
    """Streams the reply of row 0 as processing.reply splits it (the server's rule): the thinking under a
    "Thinking:" header (dimmed on a terminal, or hidden), then the answer, under "Answer:" once the thinking
    has closed (</think> or <answer> in the text: also where the thinking budget closed it)."""

    def __init__(self, tokenizer, hide_thinking, out=sys.stdout):
        from .processing.reply import Reply
        self.reply, self.hide, self.out = Reply(tokenizer), hide_thinking, out
        self.dim = out.isatty()
        self.thinking = self.answering = self.wrote = False

    def put(self, tokens):
        self._show(*self.reply.add(int(tokens[0])))

    def end(self):
        self._show(*self.reply.finish())
        self.out.write("\n")
        self.out.flush()

    def _show(self, thinking, answer):
        if thinking and not self.hide:
            self._write(("" if self.thinking else "Thinking: ") + self._escaped(thinking, self.dim))
            self.thinking = True
        if answer:
            closed = "</think>" in self.reply.text or "<answer>" in self.reply.text
            if closed and not self.answering:
                self._write("\nAnswer: " if self.wrote else "Answer: ")
                self.answering = True
            self._write(self._escaped(answer, False))

    @staticmethod
    def _escaped(s, dim):
        # the model's text: a raw escape or carriage return would act on the terminal
        s = CONTROL_RE.sub(lambda m: m.group().encode("unicode_escape").decode(), s)
        return f"\033[2m{s}\033[0m" if dim else s

    def _write(self, s):
        self.wrote = True
        self.out.write(s)
        self.out.flush()


def write_boxes(source, answer, out):
    """The answer's <|begin_of_box|>[x1,y1,x2,y2]<|end_of_box|> (0-1000 of each side) drawn on the original image."""
    from .processing.boxes import draw_boxes, parse_boxes
    from .processing.image import open_image
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
    from .processing.image import open_image

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
    from . import Glm4vProcessor, PromptCache
    from .generation_config import GenerationError
    from .processing import strip_thinking
    from .shapes import fit

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
    model = load_model(folder, a)
    if a.adapter:
        model.load_adapter(a.adapter)
    gen = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
               repetition_penalty=a.repetition_penalty, max_thinking_tokens=a.max_thinking_tokens, seed=a.seed)
    if a.greedy:
        gen["do_sample"] = False
    elif any(v is not None for v in (a.temperature, a.top_p, a.top_k)):
        gen["do_sample"] = True
    cfg = model.generation_config.updated(**gen)   # validates the flags before any work
    ctx = model.config.text.max_position_embeddings
    print(f"[memory: {model.memory_plan()}]", file=sys.stderr)

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
        try:
            new = fit(n_prompt, ctx, cfg.max_new_tokens)
        except GenerationError as e:
            if not a.chat:
                raise
            # the session goes on: this turn is dropped, the conversation so far is kept
            print(f"this turn does not fit: {e} Send a shorter message.", file=sys.stderr)
            continue
        if new < cfg.max_new_tokens:
            print(f"note: max_new_tokens {cfg.max_new_tokens} is cut to {new}: the prompt has {n_prompt} "
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
    silence_other_ranks()   # no MindSpore import: the SIGINT mask above is set before any thread
    a = parse(sys.argv[1:] if argv is None else argv)
    setup_process(a.no_compile_cache)
    try:
        return run(a)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:   # ours are ValueErrors; RuntimeError: MindSpore's own
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
