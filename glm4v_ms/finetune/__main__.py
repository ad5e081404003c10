"""python -m glm4v_ms.finetune [config.yaml] [--key value ...]   (also the console script glm4v-ms-finetune)

LoRA, full and freeze fine-tuning of GLM-4.1V / GLM-4.5V with LLaMA-Factory's keys (see args.py) and its data encoding (data.py).
Everything the run reads is checked before the model loads: the keys, the checkpoint's processor, every sample
and its media; a problem is one line on stderr and exit status 2, with nothing written to output_dir. With
tokenized_path the encoded samples are written to DIR/train.jsonl (and DIR/eval.jsonl with val_size) and the run
stops there; otherwise glm4v_ms.finetune.trainer trains.
"""
import json
import os
import re
import sys
import tempfile

from . import interrupt
from .args import FinetuneError, parse

USAGE = ("usage: python -m glm4v_ms.finetune [config.yaml] [--key value ...]   (or glm4v-ms-finetune)\n\n"
         "LoRA / full / freeze fine-tuning with LLaMA-Factory's keys (model_name_or_path, dataset, output_dir, "
         "finetuning_type, lora_rank, ...): "
         "see the README's Fine-tuning section.")


def _latest_checkpoint(folder):
    steps = [(int(m.group(1)), n) for n in os.listdir(folder)
             if (m := re.fullmatch(r"checkpoint-(\d+)", n)) and os.path.isdir(os.path.join(folder, n))]
    return os.path.join(folder, max(steps)[1]) if steps else None


def check_output_dir(args):
    """An existing non-empty output_dir needs overwrite_output_dir, unless the run resumes: from
    resume_from_checkpoint, or (as LLaMA-Factory does) from the newest checkpoint-N found there."""
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise FinetuneError(f"output_dir: {out} exists and is not a folder")
    if not os.path.isdir(out) or not os.listdir(out) or args.overwrite_output_dir or args.resume_from_checkpoint:
        return
    latest = _latest_checkpoint(out)
    if latest is None:
        raise FinetuneError(f"output_dir: {out} exists and is not empty; set overwrite_output_dir true "
                            "(or resume_from_checkpoint)")
    args.resume_from_checkpoint = latest
    print(f"[resuming from {latest}: set overwrite_output_dir true or another output_dir to start afresh]",
          file=sys.stderr)


def write_tokenized(folder, parts):
    """name.jsonl per part, one {"input_ids", "labels"} line per sample, each file written whole or not at all."""
    os.makedirs(folder, exist_ok=True)
    for name, samples in parts:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for s in samples:
                    f.write(json.dumps({"input_ids": s.input_ids.tolist(), "labels": s.labels.tolist()}) + "\n")
            os.replace(tmp, os.path.join(folder, f"{name}.jsonl"))
        except BaseException:
            os.unlink(tmp)
            raise


def prepare(argv):
    """Keys, model folder, output_dir, processor and data -> (args, train, eval, processor), all checked."""
    from ..faces import resolve_model
    from ..processing import Glm4vProcessor, ProcessorError
    from . import data

    args = parse(argv)
    try:
        args.model_name_or_path = resolve_model(args.model_name_or_path)
    except ValueError as e:   # not a demo, a folder or a hub id: one line
        raise FinetuneError(str(e)) from None
    if args.finetuning_type != "lora":   # the base and the freeze keys, from config.json alone
        from .full import check
        check(args, args.model_name_or_path)
    for adapter in (args.adapter_name_or_path or "").split(","):
        if adapter.strip() and not os.path.isfile(os.path.join(adapter.strip(), "adapter_config.json")):
            raise FinetuneError(f"adapter_name_or_path: {adapter.strip()} is not a folder with adapter_config.json")
    if args.tokenized_path is None:
        if args.resume_from_checkpoint is not None and not os.path.isdir(args.resume_from_checkpoint):
            raise FinetuneError(f"resume_from_checkpoint: {args.resume_from_checkpoint} is not a folder")
        check_output_dir(args)
    try:
        processor = Glm4vProcessor.from_pretrained(args.model_name_or_path)
    except ProcessorError as e:
        raise FinetuneError(f"model_name_or_path: {e}") from None
    train, evaluation = data.load(args, processor)
    n_tokens = sum(len(s.input_ids) for s in train)
    n_trained = sum(int((s.labels != data.IGNORE).sum()) for s in train)
    print(f"[data] {len(train)} training samples" + (f", {len(evaluation)} eval" if args.val_size else "")
          + f": {n_tokens} tokens, {n_trained} trained (template {args.template}, cutoff_len {args.cutoff_len})",
          file=sys.stderr)
    return args, train, evaluation, processor


def main(argv=None):
    # first, before anything imports MindSpore: SIGINT blocked in this thread (and every thread started later)
    # and taken by interrupt.py's watcher, since MindSpore replaces Python's handler at each compile
    interrupt.watch()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    try:
        args, train, evaluation, processor = prepare(argv)
        if args.tokenized_path is not None:
            write_tokenized(args.tokenized_path, [("train", train)] + ([("eval", evaluation)] if evaluation else []))
            print(f"[data] wrote {len(train)} samples to {os.path.join(args.tokenized_path, 'train.jsonl')}",
                  file=sys.stderr)
            return 0
        from .trainer import run   # MindSpore is imported here, after every check
        run(args, train, evaluation, processor)
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # while reading the data (the trainer saves a checkpoint on its own first)
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
