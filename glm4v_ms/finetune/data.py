"""Fine-tuning data as LLaMA-Factory 0.9.5 reads and encodes it, for its glm4v / glm4_5v templates.

Reading (its parser.py / converter.py): `dataset` names entries of `dataset_dir/dataset_info.json` (file_name,
formatting sharegpt or alpaca, columns, tags; an entry's `tags` replaces every tag, so one that names no
`system_tag` has none) or is a path to a .json / .jsonl file, read as GLM-V's README writes it (sharegpt with
`messages`, `images`, `videos`, roles user / assistant / system). Media paths are taken relative to `media_dir`
first (default: dataset_dir for a name, the file's folder for a path), else as written.

Encoding (its template.py, ReasoningTemplate, SupervisedDatasetProcessor, GLM4VPlugin): prefix `[gMASK]<sop>`,
`<|system|>\n{system}`, `<|user|>\n{content}<|assistant|>`, `\n{content}`, each piece tokenized on its own; an
assistant turn without `<think>` / `</think>` gets the empty CoT `<think>\n\n</think>\n\n` in its reply (trained)
or, with enable_thinking false, in its prompt (not trained, and every CoT of the form
`<think>\n...\n</think>\n\n` is removed first); prompt tokens -100, every reply trained, and with efficient_eos the
first prompt token of each later turn labelled eos and one eos appended; mask_history trains only the last turn
and drops the history's CoT unless preserve_thinking; cutoff_len shared between prompt and reply by infer_seqlen.
Images: opened as they are (no EXIF turn), shrunk to image_max_pixels and grown to image_min_pixels with PIL's
default filter, made RGB, then a side under 28 grown to 28 and an aspect over 200 clamped; videos sampled at
video_fps up to video_maxlen frames (an odd count repeats the last), each frame sized by video_max_pixels /
video_min_pixels likewise, then handed to the video processor with LLaMA-Factory's metadata (2 fps whatever
video_fps is: with video_fps above the processor's own 2 fps the processor keeps only the first part of the
frames, as in LLaMA-Factory).

Deliberate differences: a sample whose image or video tokens cutoff_len would cut is dropped and counted
(LLaMA-Factory cuts inside the span and the run fails later with "image features and image tokens do not
match"); none left is an error. A sample LLaMA-Factory would skip with a warning (roles out of order, an odd
message count) or crash on (tags and media counts apart) is an error naming it. A video's frame labels are the
whole seconds the model's processor writes (LLaMA-Factory 0.9.5 reads timestamps transformers 5's video processor
no longer returns, and labels every frame 0), and each video its own frame count (it takes the first video's for
all). The val_size split is a seeded permutation, not the datasets library's.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass

import numpy as np

from .args import FinetuneArgs, FinetuneError

IGNORE = -100
IMAGE_TAG, VIDEO_TAG = "<image>", "<video>"
PREFIX = "[gMASK]<sop>"
THOUGHT = ("<think>\n", "\n</think>\n\n")
MEDIA_TOKENS = ("<|image|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>")
TEMPLATE_FOR_MODEL = {"glm4v": "glm4v", "glm4v_moe": "glm4_5v"}

# DatasetAttr's defaults, and what an entry's "columns" / "tags" replace (all of them, missing ones with None)
COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None,
           "messages": "conversations", "system": None, "tools": None, "images": None, "videos": None,
           "audios": None, "chosen": None, "rejected": None, "kto_tag": None}
TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
        "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
# a .json / .jsonl path given as `dataset`: GLM-V's README format
FILE_ATTR = {"formatting": "sharegpt", "columns": {"messages": "messages", "images": "images", "videos": "videos"},
             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                      "system_tag": "system"}}
ENTRY_KEYS = {"file_name", "formatting", "ranking", "subset", "split", "folder", "num_samples", "columns", "tags"}


class Sample:
    """input_ids and labels, int64 (L,), labels IGNORE where not trained; `media`: the processor arrays present
    (pixel_values (N, D) float32, image_grid_thw (n, 3) int64, pixel_values_videos, video_grid_thw).

    A sample made by `encode` keeps its media as the way to make them, not the arrays, and remakes them on each
    access (as LLaMA-Factory's collator does per batch): a dataset's pixels would not fit in memory at once."""

    __slots__ = ("input_ids", "labels", "_media", "_make")

    def __init__(self, input_ids, labels, media=None, make=None):
        self.input_ids, self.labels = input_ids, labels
        self._media, self._make = media, make

    @property
    def media(self) -> dict:
        if self._media is not None:
            return self._media
        return self._make() if self._make is not None else {}

    def __repr__(self):
        return f"Sample(len={len(self.input_ids)}, trained={int((self.labels != IGNORE).sum())})"


@dataclass
class Record:
    """One conversation as read: alternating user / assistant messages (even count), media paths resolved."""
    where: str                       # "<dataset> sample <i>", for messages
    messages: list
    system: str
    images: list
    videos: list


# --- reading ---------------------------------------------------------------------------------------------------

def _dataset_attr(name, args):
    """(attr dict, list of files, media_dir) for one `dataset` entry."""
    info_path = os.path.join(args.dataset_dir, "dataset_info.json")
    info = None
    if os.path.isfile(info_path):
        try:
            with open(info_path, encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FinetuneError(f"{info_path}: not JSON ({e})") from None
        if not isinstance(info, dict):
            raise FinetuneError(f"{info_path}: expected an object of dataset entries")
    if info is not None and name in info:
        entry = info[name]
        if not isinstance(entry, dict):
            raise FinetuneError(f"{info_path}: entry {name}: expected an object")
        for key in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"):
            if key in entry:
                raise FinetuneError(f"dataset {name}: {key} is not supported here (download it and give its "
                                    "file_name)")
        unknown = sorted(set(entry) - ENTRY_KEYS)
        if unknown:
            raise FinetuneError(f"{info_path}: entry {name}: unknown key {unknown[0]}")
        if "file_name" not in entry:
            raise FinetuneError(f"{info_path}: entry {name}: no file_name")
        for key, rule in (("ranking", False), ("num_samples", None)):
            if entry.get(key, rule) != rule:
                raise FinetuneError(f"dataset {name}: {key} is not supported (supervised fine-tuning reads every "
                                    "sample once)")
        if entry.get("formatting", "alpaca") not in ("alpaca", "sharegpt"):
            raise FinetuneError(f"dataset {name}: formatting {entry['formatting']!r} is not supported "
                                "(sharegpt or alpaca)")
        path = os.path.join(args.dataset_dir, entry["file_name"])
        if os.path.isdir(path):
            files = [os.path.join(path, n) for n in sorted(os.listdir(path))]
        elif os.path.isfile(path):
            files = [path]
        else:
            raise FinetuneError(f"dataset {name}: file {path} not found")
        return entry, files, args.media_dir or args.dataset_dir
    if name.endswith((".json", ".jsonl")):
        if not os.path.isfile(name):
            raise FinetuneError(f"dataset {name}: file not found")
        return FILE_ATTR, [name], args.media_dir or os.path.dirname(os.path.abspath(name))
    where = f"{info_path}" if info is not None else f"{args.dataset_dir}/ (no dataset_info.json there)"
    raise FinetuneError(f"dataset {name}: not an entry of {where}, nor a .json / .jsonl file")


def _rows(path):
    """A .json file (an array of objects, or one object a line) or .jsonl -> list of rows."""
    ext = os.path.splitext(path)[1]
    if ext not in (".json", ".jsonl"):
        raise FinetuneError(f"{path}: only .json and .jsonl files are read (got {ext or 'no extension'})")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise FinetuneError(f"{path}: cannot read ({e})") from None
    stripped = text.lstrip()
    if ext == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise FinetuneError(f"{path}: not JSON ({e})") from None
    else:   # JSON lines (what the datasets library also accepts in a .json file)
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise FinetuneError(f"{path} line {n}: not JSON ({e})") from None
    return rows


def _resolve_media(value, kind, where, media_dir):
    """A row's images / videos value -> resolved file paths (joined with media_dir when that file exists)."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for j, item in enumerate(items):
        if not isinstance(item, str) or not item:
            raise FinetuneError(f"{where}: {kind}[{j}]: expected a file path, got {item!r}")
        joined = os.path.join(media_dir, item)
        path = joined if os.path.isfile(joined) else item
        if not os.path.isfile(path):
            raise FinetuneError(f"{where}: {kind}[{j}]: file not found: {item} (looked in {media_dir} too)")
        out.append(path)
    return out


def _sharegpt(row, attr, where):
    """SharegptDatasetConverter's reading, its skips made errors: -> (messages, system)."""
    cols, tags = attr["columns"], attr["tags"]
    messages = row.get(cols["messages"]) if cols["messages"] else None
    if not isinstance(messages, list):
        raise FinetuneError(f"{where}: {cols['messages']}: missing or not a list")
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or role_tag not in m or content_tag not in m:
            raise FinetuneError(f"{where}: {cols['messages']}[{j}]: expected an object with {role_tag!r} and "
                                f"{content_tag!r}")
    system = row.get(cols["system"], "") if cols["system"] else ""
    if tags["system_tag"] and messages and messages[0][role_tag] == tags["system_tag"]:
        system, messages = messages[0][content_tag], messages[1:]
        first = 1
    else:
        first = 0
    expect = (tags["user_tag"], tags["assistant_tag"])
    out = []
    for j, m in enumerate(messages):
        role, content = m[role_tag], m[content_tag]
        loc = f"{where}: {cols['messages']}[{j + first}]"
        if role in (tags["observation_tag"], tags["function_tag"]) and role not in expect:
            raise FinetuneError(f"{loc}.{role_tag}: {role!r} (tool turns) is not supported")
        if role != expect[j % 2]:
            extra = (" (this dataset's tags name no system_tag: add \"system_tag\": \"system\" to its entry)"
                     if role == "system" and not tags["system_tag"] else "")
            raise FinetuneError(f"{loc}.{role_tag}: expected {expect[j % 2]!r} (roles alternate user, assistant), "
                                f"got {role!r}{extra}")
        if not isinstance(content, str):
            raise FinetuneError(f"{loc}.{content_tag}: expected text, got {type(content).__name__}")
        if j % 2 and not content.strip():
            raise FinetuneError(f"{loc}.{content_tag}: empty assistant turn")
        out.append({"role": "user" if j % 2 == 0 else "assistant", "content": content})
    if not isinstance(system, str):
        raise FinetuneError(f"{where}: system: expected text, got {type(system).__name__}")
    return out, system


def _alpaca(row, attr, where):
    """AlpacaDatasetConverter's reading: history pairs, then "instruction\\ninput" -> output."""
    cols = attr["columns"]
    messages = []
    history = row.get(cols["history"]) if cols["history"] else None
    if isinstance(history, list):
        for j, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                raise FinetuneError(f"{where}: {cols['history']}[{j}]: expected [prompt, response]")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    query = [row[c] for c in (cols["prompt"], cols["query"]) if c and row.get(c)]
    if not all(isinstance(q, str) for q in query):
        raise FinetuneError(f"{where}: {cols['prompt']}: expected text")
    response = row.get(cols["response"]) if cols["response"] else None
    if not isinstance(response, str):
        raise FinetuneError(f"{where}: {cols['response']}: missing or not text")
    if not response.strip():
        raise FinetuneError(f"{where}: {cols['response']}: empty assistant turn")
    messages += [{"role": "user", "content": "\n".join(query)}, {"role": "assistant", "content": response}]
    system = row.get(cols["system"], "") if cols["system"] else ""
    if not isinstance(system, str):
        raise FinetuneError(f"{where}: {cols['system']}: expected text")
    return messages, system


def _joined(entry):
    """DatasetAttr.join: "columns" / "tags" given replace every column / tag (missing ones become None)."""
    cols = {k: entry["columns"].get(k) for k in COLUMNS} if "columns" in entry else dict(COLUMNS)
    tags = {k: entry["tags"].get(k) for k in TAGS} if "tags" in entry else dict(TAGS)
    return {"formatting": entry.get("formatting", "alpaca"), "columns": cols, "tags": tags}


def read(args: FinetuneArgs) -> list:
    """Every `dataset` -> Records, checked (roles, turns, tags against media, media files), in dataset order."""
    records = []
    for name in args.dataset:
        entry, files, media_dir = _dataset_attr(name, args)
        attr = _joined(entry)
        rows = [(path, i, row) for path in files for i, row in enumerate(_rows(path))]
        if args.max_samples is not None:
            rows = rows[:args.max_samples]
        for path, i, row in rows:
            where = f"{os.path.basename(path) if len(args.dataset) == 1 else name} sample {i}"
            if not isinstance(row, dict):
                raise FinetuneError(f"{where}: expected an object, got {type(row).__name__}")
            convert = _sharegpt if attr["formatting"] == "sharegpt" else _alpaca
            messages, system = convert(row, attr, where)
            if not messages:
                raise FinetuneError(f"{where}: {attr['columns']['messages']}: no messages")
            if len(messages) % 2:
                raise FinetuneError(f"{where}: {attr['columns']['messages']}: the last turn is the user's "
                                    "(each user turn needs an assistant reply)")
            cols = attr["columns"]
            images = _resolve_media(row.get(cols["images"]), cols["images"], where, media_dir) if cols["images"] else []
            videos = _resolve_media(row.get(cols["videos"]), cols["videos"], where, media_dir) if cols["videos"] else []
            for tag, found, column in ((IMAGE_TAG, images, cols["images"] or "images"),
                                       (VIDEO_TAG, videos, cols["videos"] or "videos")):
                n = sum(m["content"].count(tag) for m in messages)
                if n != len(found):
                    raise FinetuneError(f"{where}: {column}: {n} {tag} tag(s) in the messages but "
                                        f"{len(found)} {column} given")
            records.append(Record(where, messages, system, images, videos))
    if not records:
        raise FinetuneError(f"dataset {','.join(args.dataset)}: empty (no samples)")
    return records


def split(records, val_size, seed):
    """(train, eval) records: val_size under 1 is a fraction (rounded up), else a count; both keep dataset order."""
    if val_size <= 1e-6:
        return records, []
    n = len(records)
    n_eval = int(val_size) if val_size >= 1 else math.ceil(val_size * n)
    if n_eval >= n:
        raise FinetuneError(f"val_size: {val_size} leaves no training samples of {n}")
    chosen = set(np.random.default_rng(seed).permutation(n)[:n_eval].tolist())
    return [r for i, r in enumerate(records) if i not in chosen], [r for i, r in enumerate(records) if i in chosen]


# --- media -----------------------------------------------------------------------------------------------------

def _fit(image, max_pixels, min_pixels):
    """LLaMA-Factory's image regularisation (MMPluginMixin + Qwen2VLPlugin._preprocess_image)."""
    if image.width * image.height > max_pixels:
        f = math.sqrt(max_pixels / (image.width * image.height))
        image = image.resize((int(image.width * f), int(image.height * f)))
    if image.width * image.height < min_pixels:
        f = math.sqrt(min_pixels / (image.width * image.height))
        image = image.resize((int(image.width * f), int(image.height * f)))
    if image.mode != "RGB":
        image = image.convert("RGB")
    if min(image.width, image.height) < 28:
        image = image.resize((max(image.width, 28), max(image.height, 28)))
    if image.width / image.height > 200:
        image = image.resize((image.height * 180, image.height))
    if image.height / image.width > 200:
        image = image.resize((image.width, image.width * 180))
    return image


def _open_image(path, where, label):
    from PIL import Image

    try:
        image = Image.open(path)
        image.load()
    except Exception as e:   # PIL raises several types for a bad file
        raise FinetuneError(f"{where}: {label}: cannot read image {path}: {e}") from None
    return image


def _video_frames(path, args, where, label):
    """LLaMA-Factory's frame sampling (Qwen2VLPlugin._regularize_videos) -> (PIL frames, duration in s)."""
    import av

    try:
        with av.open(path, "r") as container:
            stream = next((s for s in container.streams if s.type == "video"), None)
            if stream is None:
                raise FinetuneError(f"{where}: {label}: no video stream in {path}")
            total = stream.frames
            if total == 0:
                indices = np.linspace(0, args.video_maxlen - 1, args.video_maxlen).astype(np.int32)
            else:
                n = max(1, math.floor(float(stream.duration * stream.time_base) * args.video_fps))
                indices = np.linspace(0, total - 1, min(total, args.video_maxlen, n)).astype(np.int32)
            wanted = set(indices.tolist())
            container.seek(0)
            frames = [frame.to_image() for i, frame in enumerate(container.decode(stream)) if i in wanted]
            duration = (len(frames) / args.video_fps if stream.duration is None
                        else float(stream.duration * stream.time_base))
    except FinetuneError:
        raise
    except Exception as e:
        raise FinetuneError(f"{where}: {label}: cannot read video {path}: {e}") from None
    if not frames:
        raise FinetuneError(f"{where}: {label}: no frames decoded from {path}")
    if len(frames) % 2:
        frames.append(frames[-1])
    return [_fit(f, args.video_max_pixels, args.video_min_pixels) for f in frames], duration


def _media(record, args, processor):
    """A record's processor arrays, and the text replacing each <image> / <video> tag, in order."""
    from ..processing import ProcessorError
    from ..processing.video import frame_timestamps

    media, image_text, video_text = {}, [], []
    merge = processor.image_processor.merge_size ** 2
    try:
        if record.images:
            images = [_fit(_open_image(p, record.where, f"images[{j}]"), args.image_max_pixels,
                           args.image_min_pixels) for j, p in enumerate(record.images)]
            media.update(processor.image_processor(images))
            image_text = [f"<|begin_of_image|>{'<|image|>' * int(np.prod(g) // merge)}<|end_of_image|>"
                          for g in media["image_grid_thw"]]
        if record.videos:
            patches, grids = [], []
            vp = processor.video_processor
            for j, p in enumerate(record.videos):
                frames, duration = _video_frames(p, args, record.where, f"videos[{j}]")
                frames, meta = vp.prepare(frames, {"fps": 2, "duration": duration, "total_num_frames": len(frames)})
                pv, grid = vp.process_one(frames)
                patches.append(pv)
                grids.append(grid)
                per_frame = "<|image|>" * (grid[1] * grid[2] // vp.merge_size ** 2)
                video_text.append("<|begin_of_video|>" + "".join(
                    f"<|begin_of_image|>{per_frame}<|end_of_image|>{s}" for s in frame_timestamps(meta, grid[0]))
                    + "<|end_of_video|>")
            media["pixel_values_videos"] = np.concatenate(patches, 0)
            media["video_grid_thw"] = np.array(grids, dtype=np.int64)
    except ProcessorError as e:
        raise FinetuneError(f"{record.where}: {e}") from None
    return media, image_text, video_text


# --- encoding --------------------------------------------------------------------------------------------------

def remove_thought(content):
    pattern = re.compile(f"{re.escape(THOUGHT[0])}(.*?){re.escape(THOUGHT[1])}", re.DOTALL)
    return re.sub(pattern, "", content).lstrip("\n")


def infer_seqlen(source_len, target_len, cutoff_len):
    """LLaMA-Factory's split of the remaining budget between a turn's prompt and reply."""
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target = min(max_target, target_len)
    new_source = min(max(cutoff_len - new_target, 0), source_len)
    return new_source, new_target


def encode_pairs(messages, system, args, tokenizer):
    """The template's (prompt ids, reply ids) per turn (ReasoningTemplate.encode_multiturn)."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False) if text else []  # noqa: E731
    messages = [dict(m) for m in messages]
    if args.enable_thinking is False:
        for m in messages[1::2]:
            m["content"] = remove_thought(m["content"])
    drop_history_cot = args.mask_history and not args.preserve_thinking
    if drop_history_cot:
        for m in messages[1:-2:2]:
            m["content"] = remove_thought(m["content"])
    system = system or args.default_system or ""
    encoded = []
    for i, m in enumerate(messages):
        ids = []
        if i == 0:
            ids += encode(PREFIX)
            if system:
                ids += encode(f"<|system|>\n{system}")
        ids += encode(f"<|user|>\n{m['content']}<|assistant|>" if i % 2 == 0 else f"\n{m['content']}")
        encoded.append(ids)
    thought = encode(THOUGHT[0] + THOUGHT[1])
    for i in ([len(messages) - 2] if drop_history_cot else range(0, len(messages), 2)):
        reply = messages[i + 1]["content"]
        if THOUGHT[0].strip() not in reply and THOUGHT[1].strip() not in reply:
            if not args.enable_thinking:
                encoded[i] = encoded[i] + thought
            else:
                encoded[i + 1] = thought + encoded[i + 1]
    return [(encoded[i], encoded[i + 1]) for i in range(0, len(encoded), 2)]


def encode_ids(pairs, args, eos_id):
    """SupervisedDatasetProcessor._encode_data_example's labelling and truncation -> (input_ids, labels)."""
    input_ids, labels = [], []
    total = 1   # efficient_eos: room for the final eos
    if args.mask_history:
        pairs = pairs[::-1]   # the last turns first
    for turn, (source, target) in enumerate(pairs):
        if total >= args.cutoff_len:
            break
        source_len, target_len = infer_seqlen(len(source), len(target), args.cutoff_len - total)
        source, target = source[:source_len], target[:target_len]
        total += source_len + target_len
        source_label = ([eos_id] + [IGNORE] * (source_len - 1)) if turn != 0 else [IGNORE] * source_len
        target_label = [IGNORE] * target_len if args.mask_history and turn != 0 else target
        if args.mask_history:
            input_ids = source + target + input_ids
            labels = source_label + target_label + labels
        else:
            input_ids += source + target
            labels += source_label + target_label
    return input_ids + [eos_id], labels + [eos_id]


def encode(record, args, processor):
    """One record -> Sample, or None when cutoff_len would cut into its image or video tokens."""
    tok = processor.tokenizer
    media, image_text, video_text = _media(record, args, processor)
    queues = {IMAGE_TAG: iter(image_text), VIDEO_TAG: iter(video_text)}
    tag = re.compile(re.escape(IMAGE_TAG) + "|" + re.escape(VIDEO_TAG))
    messages = [{**m, "content": tag.sub(lambda t: next(queues[t.group(0)]), m["content"])} for m in record.messages]
    pairs = encode_pairs(messages, record.system, args, tok)
    input_ids, labels = encode_ids(pairs, args, tok.eos_token_id)
    special = [tok.token_to_id(t) for t in MEDIA_TOKENS]
    if record.images or record.videos:
        full = np.array([i for s, t in pairs for i in s + t])
        kept = np.array(input_ids)
        if any((full == t).sum() != (kept == t).sum() for t in special):
            return None
    make = (lambda: _media(record, args, processor)[0]) if media else None
    return Sample(np.array(input_ids, dtype=np.int64), np.array(labels, dtype=np.int64), make=make)


def default_template(model_dir):
    """glm4v / glm4_5v from the checkpoint's config.json model_type."""
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as e:
        raise FinetuneError(f"template: cannot read {path} to choose one ({e}); set template") from None
    if model_type not in TEMPLATE_FOR_MODEL:
        raise FinetuneError(f"template: model_type {model_type!r} is neither glm4v nor glm4v_moe; set template")
    return TEMPLATE_FOR_MODEL[model_type]


def load(args: FinetuneArgs, processor, log=None):
    """The datasets -> (train, eval) Samples. Every record is read and checked before any is encoded."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if args.template is None:   # glm4v and glm4_5v encode alike; the name is kept for the record
        args.template = default_template(args.model_name_or_path)
    train_records, eval_records = split(read(args), args.val_size, args.seed)
    out = []
    for part, records in (("train", train_records), ("eval", eval_records)):
        samples = [encode(r, args, processor) for r in records]
        dropped = sum(s is None for s in samples)
        samples = [s for s in samples if s is not None]
        if dropped:
            log(f"[data] dropped {dropped} of {len(records)} {part} samples: cutoff_len={args.cutoff_len} would cut "
                "into their image or video tokens (raise cutoff_len or lower image_max_pixels)")
        if part == "train" and not samples:
            raise FinetuneError(f"cutoff_len: {args.cutoff_len} cuts into the image or video tokens of every "
                                "training sample (raise cutoff_len or lower image_max_pixels / video_max_pixels)")
        out.append(samples)
    return out[0], out[1]


def collate(samples, pad_id):
    """Samples -> one right-padded batch: input_ids, attention_mask, labels (IGNORE at pads) + media in order."""
    n = max(len(s.input_ids) for s in samples)
    ids = np.full((len(samples), n), pad_id, dtype=np.int64)
    mask = np.zeros((len(samples), n), dtype=np.int64)
    labels = np.full((len(samples), n), IGNORE, dtype=np.int64)
    for row, s in enumerate(samples):
        k = len(s.input_ids)
        ids[row, :k], mask[row, :k], labels[row, :k] = s.input_ids, 1, s.labels
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    media = [s.media for s in samples]   # made once per sample here
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [m[key] for m in media if key in m]
        if parts:
            batch[key] = np.concatenate(parts, 0)
    return batch
