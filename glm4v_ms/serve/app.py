"""The OpenAI-compatible HTTP API (FastAPI) over the engine thread.

Handlers validate the request, load media and run the processor off the event loop, then submit to the engine and
read tokens back from an asyncio queue the engine's listener fills (call_soon_threadsafe). A client that goes
away cancels its request, which frees its row at the engine's next step.

Shapes follow vLLM's (../shared/SERVING.md): `reasoning_content` and `reasoning` (the same text), `content` with
no <think>/<answer> tags, `finish_reason`, `usage`; SSE chunks ending `data: [DONE]`; errors
{"error": {"message", "type", "param", "code"}} with the HTTP status. Extra: `boxes` beside `content` (grounding
boxes in pixels of the last image of the request; see processing/boxes.py).
"""
from __future__ import annotations

import asyncio
import json
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import QueueFull
from ..generation_config import GenerationError
from ..processing.boxes import parse_boxes
from ..processing.chat import strip_thinking
from ..processing.errors import ProcessorError
from .media import MediaError, MediaLoader, pdf_pages
from ..processing.reply import Reply, split

PAGE = os.path.join(os.path.dirname(__file__), "page.html")
MAX_N = 16   # choices per request (`n`): each takes a row of the engine
_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 413: "RequestTooLargeError",
          503: "ServiceUnavailableError", 500: "InternalServerError",
          501: "NotImplementedError"}
# OpenAI fields we do not implement: refused by name rather than ignored
_UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call", "response_format",
                "logit_bias", "presence_penalty", "frequency_penalty", "audio", "modalities", "prediction")
_KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "repetition_penalty", "seed", "stop", "stream", "stream_options", "chat_template_kwargs",
          "max_thinking_tokens", "min_tokens", "n", "user", *_UNSUPPORTED}


class ApiError(Exception):
    def __init__(self, status, message, param=None, kind=None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(status, message, param=None, kind=None):
    return {"error": {"message": message, "type": kind or _TYPES.get(status, "BadRequestError"), "param": param,
                      "code": status}}


def _error(status, message, param=None, kind=None):
    return JSONResponse(error_body(status, message, param, kind), status_code=status)


class Server:
    """What the app serves: the model's processor and defaults, the engine, and the limits."""

    def __init__(self, engine, processor, name, api_key=None, allowed_local_media_path=None, max_images=8,
                 max_media_bytes=32 << 20, max_request_bytes=64 << 20, bank=None, runtime_lora=False):
        """bank: the multi_lora.Bank on the engine's model (None: no LoRA), whose adapters a request's `model`
        may name; runtime_lora: /v1/load_lora_adapter and /v1/unload_lora_adapter change them."""
        self.engine, self.processor, self.name, self.api_key = engine, processor, name, api_key
        self.bank, self.runtime_lora = bank, runtime_lora
        self.adapters = bank.adapters if bank is not None else {}   # name -> multi_lora.Adapter, in load order
        self.loading = set()   # names of runtime loads under way (a second load of one of them: refused)
        self.media = MediaLoader(allowed_local_media_path, max_media_bytes)
        self.max_images, self.max_request_bytes = max_images, max_request_bytes
        self.defaults = engine.model.generation_config
        self.created = int(time.time())


# ---------------------------------------------------------------------------------------------- request parsing

def _typed(body, key, kinds, what, check=None, msg=None):
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise ApiError(400, f"'{key}' must be {what}", key)
    if check is not None and not check(v):
        raise ApiError(400, f"'{key}' {msg}", key)
    return v


def sampling(server: Server, body: dict):
    """The request's generation settings over the checkpoint's defaults -> (GenerationConfig, max new tokens)."""
    num, integer = (int, float), (int,)
    max_tokens = _typed(body, "max_completion_tokens", integer, "an integer", lambda v: v >= 1, "must be >= 1")
    if max_tokens is None:
        max_tokens = _typed(body, "max_tokens", integer, "an integer", lambda v: v >= 1, "must be >= 1")
    temperature = _typed(body, "temperature", num, "a number", lambda v: 0 <= v <= 100, "must be in [0, 100]")
    top_p = _typed(body, "top_p", num, "a number", lambda v: 0 < v <= 1, "must be in (0, 1]")
    top_k = _typed(body, "top_k", integer, "an integer", lambda v: v >= -1, "must be >= -1 (-1 or 0: off)")
    rep = _typed(body, "repetition_penalty", num, "a number", lambda v: v > 0, "must be > 0")
    seed = _typed(body, "seed", integer, "an integer")
    budget = _typed(body, "max_thinking_tokens", integer, "an integer", lambda v: v >= 0, "must be >= 0")
    min_tokens = _typed(body, "min_tokens", integer, "an integer", lambda v: v >= 0, "must be >= 0")
    n = _typed(body, "n", integer, "an integer", lambda v: 1 <= v <= MAX_N, f"must be in [1, {MAX_N}]") or 1
    kw = dict(top_p=top_p, top_k=0 if top_k == -1 else top_k, repetition_penalty=rep, seed=seed,
              max_thinking_tokens=budget, min_new_tokens=min_tokens)
    if temperature is not None:   # OpenAI: temperature 0 is greedy
        kw["do_sample"] = temperature > 0
        if temperature > 0:
            kw["temperature"] = float(temperature)
    try:
        cfg = server.defaults.updated(**kw)
    except GenerationError as e:
        raise ApiError(400, str(e)) from None
    return cfg, max_tokens, n


def _stops(body):
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        return stop
    raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")


def messages_for_processor(server: Server, messages):
    """OpenAI messages -> the processor's chat (images decoded) and the list of images (for boxes)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    chat, images, videos = [], [], 0
    for i, m in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"{p} must be an object with role system, user or assistant", p)
        content = m.get("content")
        if isinstance(content, str) or content is None:
            msg = {"role": m["role"], "content": content or ""}
        elif isinstance(content, list):
            items = []
            for j, part in enumerate(content):
                q = f"{p}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    items.append({"type": "text", "text": part["text"]})
                elif kind in ("image_url", "video_url"):
                    ref = part.get(kind)
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    if not isinstance(url, str) or not url:
                        raise ApiError(400, f"{q}.{kind} must hold a 'url' string", q)
                    if kind == "image_url":
                        images.append(url)
                        if len(images) > server.max_images:
                            raise ApiError(400, f"too many images: at most {server.max_images} per request", q)
                        items.append({"type": "image", "image": (q, url)})
                    else:
                        videos += 1
                        if videos > 1:
                            raise ApiError(400, "at most one video per request", q)
                        items.append({"type": "video", "video": (q, url)})
                else:
                    raise ApiError(400, f"{q}: unsupported content part (use text, image_url or video_url)", q)
            msg = {"role": m["role"], "content": items}
        else:
            raise ApiError(400, f"{p}.content must be a string or a list of parts", p)
        chat.append(strip_thinking(msg) if m["role"] == "assistant" else msg)
    return chat


def load_media(server: Server, chat):
    """Fetch and decode the media parts in place (runs in a worker thread). Returns the decoded images."""
    images = []
    for msg in chat:
        if isinstance(msg["content"], list):
            for item in msg["content"]:
                if item["type"] == "image":
                    q, url = item["image"]
                    item["image"] = server.media.image(url, q)
                    images.append(item["image"])
                elif item["type"] == "video":
                    q, url = item["video"]
                    item["video"] = server.media.video(url, q)
    return images


def prepare(server: Server, chat, template_kwargs):
    images = load_media(server, chat)
    try:
        inputs = server.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True, **template_kwargs)
    except ProcessorError as e:
        raise ApiError(400, str(e)) from None
    except Exception as e:   # the template raised, or a video did not decode
        raise ApiError(400, f"the request could not be processed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    return inputs, images


# ---------------------------------------------------------------------------------------------- a chat completion

def read_body(server: Server, raw: bytes) -> dict:
    """The request body as a JSON object, its fields known and supported, its model this server's."""
    if len(raw) > server.max_request_bytes:
        raise ApiError(413, f"the request body is over the {server.max_request_bytes}-byte limit")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(unknown)}", unknown[0])
    for k in _UNSUPPORTED:
        if body.get(k) not in (None, False, 0, [], {}):
            raise ApiError(400, f"'{k}' is not supported by this server", k)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model")
    if model is not None and model != server.name and model not in server.adapters:
        raise ApiError(404, f"The model `{model}` does not exist.", "model")
    return body


class GenerationFailed(Exception):
    """The engine reported an error for one of the choices."""


class ChatCompletion:
    """One /v1/chat/completions request (vLLM's serving layer does the same): its settings, then its n engine
    requests (each prefilled and decoded in its own row; with a seed, choice i samples with seed + i: distinct
    choices, the same ones on every run) and their replies; `whole()` the response, `sse()` the streamed one.
    Engine events reach it on the event loop through an asyncio queue its listeners fill
    (call_soon_threadsafe); a client that goes away cancels every choice."""

    def __init__(self, server: Server, body: dict, request: Request):
        self.server, self.request = server, request
        # the base, or an adapter (read_body checked the name): replies name what the request named
        self.model = body.get("model") or server.name
        # held by the request from here: an unload meanwhile does not disturb it (vLLM's requests keep theirs too)
        self.adapter = server.adapters.get(self.model) if self.model != server.name else None
        if self.model != server.name and self.adapter is None:   # unloaded since read_body
            raise ApiError(404, f"The model `{self.model}` does not exist.", "model")
        self.stream = _typed(body, "stream", (bool,), "a boolean") or False
        opts = _typed(body, "stream_options", (dict,), "an object") or {}
        self.include_usage = bool(opts.get("include_usage"))
        self.template_kwargs = _typed(body, "chat_template_kwargs", (dict,), "an object") or {}
        self.cfg, self.max_tokens, self.n = sampling(server, body)
        self.stops = _stops(body)
        self.chat = messages_for_processor(server, body.get("messages"))
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.reqs, self.reasons = [], [None] * self.n
        self.replies = [Reply(server.processor.tokenizer, self.stops) for _ in range(self.n)]

    async def start(self):
        """Media and processor off the event loop, then the n requests to the engine."""
        try:
            inputs, images = await asyncio.to_thread(prepare, self.server, self.chat, self.template_kwargs)
        except MediaError as e:
            raise ApiError(e.status, str(e), e.param) from None
        self.n_prompt = int(inputs["input_ids"].shape[1])
        self.size = images[-1].size if images else (None, None)
        loop, self.events = asyncio.get_running_loop(), asyncio.Queue()   # (choice, kind, value)
        engine, cfg = self.server.engine, self.cfg
        try:
            # max_tokens None: what the row leaves, within the checkpoint's max_new_tokens (submit checks the fit)
            new = self.max_tokens or min(cfg.max_new_tokens, engine.check_prompt(self.n_prompt, None))
            for i in range(self.n):
                c = cfg if cfg.seed is None or i == 0 else cfg.updated(seed=cfg.seed + i)
                tell = (lambda i: lambda kind, value: loop.call_soon_threadsafe(self.events.put_nowait,
                                                                                (i, kind, value)))(i)
                self.reqs.append(engine.submit(inputs, c, new, tell, adapter=self.adapter))
        except (GenerationError, QueueFull, RuntimeError) as e:
            self.cancel()
            status = 400 if isinstance(e, GenerationError) else 503 if isinstance(e, QueueFull) else 500
            raise ApiError(status, str(e), "messages" if status == 400 else None) from None

    def cancel(self):
        for r in self.reqs:
            r.cancel()

    async def _next(self):
        """The next event of a choice still going, applied to its reply: (choice, (reasoning, content) delta);
        None when the client went away (every choice is cancelled). GenerationFailed on an engine error."""
        while True:
            try:
                i, kind, value = await asyncio.wait_for(self.events.get(), 1.0)
            except asyncio.TimeoutError:
                if await self.request.is_disconnected():
                    self.cancel()
                    return None
                continue
            if self.reasons[i] is not None:   # a choice ended by a stop string still hears its cancel: ignored
                continue
            reply = self.replies[i]
            if kind == "token":
                delta = reply.add(value)
                if reply.stopped:
                    self.reqs[i].cancel()
                    self.reasons[i] = "stop"
                return i, delta
            if kind == "done":
                self.reasons[i] = {"stop": "stop", "length": "length", "cancelled": "stop"}.get(value, value)
                return i, reply.finish()
            raise GenerationFailed(value)

    def usage(self) -> dict:
        done = sum(len(r.tokens) for r in self.reqs)
        return {"prompt_tokens": self.n_prompt, "completion_tokens": done, "total_tokens": self.n_prompt + done}

    def boxes(self, i) -> list:
        return parse_boxes(split(self.replies[i].text)[1], *self.size)

    async def whole(self):
        while None in self.reasons:
            try:
                ev = await self._next()
            except GenerationFailed as e:
                self.cancel()
                raise ApiError(500, f"generation failed: {e}") from None
            if ev is None:
                return _error(400, "the client disconnected")
        choices = []
        for i, reply in enumerate(self.replies):
            reasoning, content = reply.result()
            message = {"role": "assistant", "content": content, "reasoning_content": reasoning or None,
                       "reasoning": reasoning or None, "boxes": self.boxes(i), "tool_calls": []}
            choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": self.reasons[i],
                            "stop_reason": None})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(), "system_fingerprint": None}

    def _chunk(self, choices, **extra) -> str:
        return "data: " + json.dumps({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                      "model": self.model, "choices": choices, **extra},
                                     ensure_ascii=False) + "\n\n"

    def _choice(self, i, delta, reason=None, **extra) -> str:
        return self._chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason, **extra}])

    async def sse(self):
        done = False
        try:
            for i in range(self.n):
                yield self._choice(i, {"role": "assistant", "content": ""})
            while None in self.reasons:
                try:
                    ev = await self._next()
                except GenerationFailed as e:
                    yield "data: " + json.dumps(error_body(500, f"generation failed: {e}")) + "\n\n"
                    yield "data: [DONE]\n\n"
                    return
                if ev is None:
                    return
                i, d = ev
                if _delta(*d):
                    yield self._choice(i, _delta(*d))
                if self.reasons[i] is not None:   # this choice's last chunk
                    last = _delta(*self.replies[i].finish())
                    b = self.boxes(i)
                    if b:
                        last["boxes"] = b
                    yield self._choice(i, last, self.reasons[i], stop_reason=None)
            if self.include_usage:
                yield self._chunk([], usage=self.usage())
            yield "data: [DONE]\n\n"
            done = True
        finally:
            if not done:   # the client went away mid-stream (or generation failed): stop every choice
                self.cancel()


# ---------------------------------------------------------------------------------------------- runtime adapters

def _lora_body(server: Server, raw: bytes, fields) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict) or any(not isinstance(body.get(f, ""), str) for f in fields):
        raise ApiError(400, f"the request body must be a JSON object with string {' and '.join(fields)}")
    return body


def add_lora_routes(app: FastAPI, server: Server, auth):
    """vLLM's runtime adapter endpoints, with its status codes, error types and replies (text/plain on success)."""
    from fastapi.responses import PlainTextResponse
    from ..multi_lora import AdapterNotFound, LoraModulesError

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        auth(request)
        body = _lora_body(server, await request.body(), ("lora_name", "lora_path"))
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            raise ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.", kind="InvalidUserInput")
        if name in server.adapters or name in server.loading or name == server.name:
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", kind="InvalidUserInput")
        if server.bank is None:
            raise ApiError(400, "LoRA is not enabled: start the server with --enable-lora (or --lora-modules)")
        server.loading.add(name)   # no await since the check above: a second load of this name is refused
        try:   # read and checked off the event loop; the engine writes it into a slot when a request needs it
            ad = await asyncio.to_thread(server.bank.read, name, path)
            # under msrun every other rank reads its slices now; where one cannot, no rank keeps it
            await asyncio.to_thread(server.engine.adapter_loaded, ad)
        except AdapterNotFound as e:
            raise ApiError(404, str(e), kind="NotFoundError") from None
        except LoraModulesError as e:
            raise ApiError(400, str(e)) from None
        except RuntimeError as e:   # the engine stopped
            raise ApiError(500, str(e)) from None
        finally:
            server.loading.discard(name)
        server.adapters[name] = ad
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        auth(request)
        name = _lora_body(server, await request.body(), ("lora_name",)).get("lora_name")
        if not name:
            raise ApiError(400, "'lora_name' needs to be provided to unload a LoRA adapter.", kind="InvalidUserInput")
        ad = server.adapters.pop(name, None)
        if ad is None:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.")
        # requests that hold it (running or waiting) finish with it; its slot goes first to the next adapter
        ad.unloaded = True
        try:   # under msrun: the other ranks are told (they keep their slices while rank 0 keeps the adapter)
            await asyncio.to_thread(server.engine.adapter_unloaded, ad)
        except RuntimeError as e:
            raise ApiError(500, str(e)) from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _delta(reasoning, content) -> dict:
    d = {}
    if reasoning:
        d["reasoning_content"] = d["reasoning"] = reasoning
    if content:
        d["content"] = content
    return d


# ---------------------------------------------------------------------------------------------- the app

def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="glm4v-ms", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(ApiError)
    async def _api_error(request, exc):
        return _error(exc.status, exc.message, exc.param, exc.kind)

    def auth(request: Request):
        if server.api_key and request.headers.get("authorization") != f"Bearer {server.api_key}":
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')")

    @app.get("/health")
    async def health():
        e = server.engine
        if e.error is not None:
            return _error(500, f"the engine stopped: {e.error}")
        out = {"status": "ok", "busy_rows": e.busy_rows(), "rows": e.max_num_seqs, "waiting": e.queued()}
        if server.bank is not None:   # which adapter each slot holds (None: empty), and how many slot writes
            out["lora_slots"], out["lora_loads"] = server.bank.resident_names(), server.bank.loads
        return out

    @app.get("/", response_class=HTMLResponse)
    async def page():
        with open(PAGE, encoding="utf-8") as f:
            return f.read().replace("__MODEL__", server.name)

    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        card = lambda name, root, parent: {  # noqa: E731  (vLLM's ModelCard; an adapter's root is its folder)
            "id": name, "object": "model", "created": server.created, "owned_by": "glm4v-ms", "root": root,
            "parent": parent, "max_model_len": server.engine.max_model_len}
        return {"object": "list", "data": [card(server.name, server.name, None)] + [
            card(n, ad.path, server.name) for n, ad in list(server.adapters.items())]}

    if server.runtime_lora:   # vLLM registers these only with VLLM_ALLOW_RUNTIME_LORA_UPDATING (else: 404)
        add_lora_routes(app, server, auth)

    @app.post("/v1/pdf/pages")
    async def pdf(request: Request):
        """The chat page's PDF upload: the body is the PDF; the reply {"pages": [PNG data URLs]}."""
        auth(request)
        raw = await request.body()
        if len(raw) > server.media.max_bytes:
            raise ApiError(413, f"the PDF is over the {server.media.max_bytes}-byte limit")
        try:
            return {"pages": await asyncio.to_thread(pdf_pages, raw, server.max_images)}
        except MediaError as e:
            raise ApiError(e.status, str(e)) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        auth(request)
        completion = ChatCompletion(server, read_body(server, await request.body()), request)
        await completion.start()
        if not completion.stream:
            return await completion.whole()
        return StreamingResponse(completion.sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
