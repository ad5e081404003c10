"""LLaMA-Factory 0.9.5 as the reference for the fine-tuning data (tests/test_finetune_data.py), imported the way
this machine needs: torchvision's op schemas and transformers first (tests/reference.py), a stub for the
torchaudio it imports but does not use here, and DISABLE_VERSION_CHECK (its pins predate transformers 5).

Its GLM4VPlugin's video path fails against transformers 5 in two argument names (it passes `images=None` and
metadata `total_frames`, which Glm4vVideoProcessor no longer takes); `LFReference` hands its video processor
those two renamed and nothing else, so its own frame sampling, resizing and token expansion still run.
"""
import copy
import importlib.util
import os
import sys

import reference  # noqa: F401  (torchvision schemas before transformers)

HERE = os.path.dirname(os.path.abspath(__file__))
if importlib.util.find_spec("torchaudio") is None or importlib.util.find_spec("trl") is None:
    sys.path.append(os.path.join(HERE, "stubs"))   # each stub is found only where the real package is missing
os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
os.environ.setdefault("LLAMAFACTORY_VERBOSITY", "ERROR")   # its per-template advice, once per reference built

from llamafactory.data.parser import get_dataset_list  # noqa: E402
from llamafactory.data.converter import get_dataset_converter  # noqa: E402
from llamafactory.data.processor.supervised import SupervisedDatasetProcessor  # noqa: E402
from llamafactory.data.template import TEMPLATES, get_template_and_fix_tokenizer  # noqa: E402
from llamafactory.hparams import DataArguments  # noqa: E402
from transformers import AutoProcessor, AutoTokenizer  # noqa: E402

MEDIA_DEFAULTS = dict(image_max_pixels=768 * 768, image_min_pixels=32 * 32, video_max_pixels=256 * 256,
                      video_min_pixels=16 * 16, video_fps=2.0, video_maxlen=128)


class _VideoProcessor:
    """transformers 5's Glm4vVideoProcessor under the two argument names LLaMA-Factory 0.9.5 still uses."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, images=None, video_metadata=None, **kwargs):
        assert images is None
        renamed = [{("total_num_frames" if k == "total_frames" else k): v for k, v in m.items()}
                   for m in video_metadata]
        return self.inner(video_metadata=renamed, **kwargs)


class LFReference:
    """LLaMA-Factory's tokenizer, processor, template and supervised processor for a checkpoint folder, loaded
    as its load_tokenizer does (right padding; the processor's media limits as attributes; the slow image
    processor, which ours equals)."""

    def __init__(self, folder, media=None, **data_args):
        self.tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="right")
        self.processor = AutoProcessor.from_pretrained(folder, use_fast=False)
        self.data_args = DataArguments(**{"template": "glm4v", **data_args})
        # its templates are module-level objects that get_template_and_fix_tokenizer changes (default_system,
        # enable_thinking): each reference works on its own copy and leaves the registered one as it was
        name = self.data_args.template
        registered = TEMPLATES[name]
        TEMPLATES[name] = copy.deepcopy(registered)
        try:
            self.template = get_template_and_fix_tokenizer(self.tokenizer, self.data_args)
        finally:
            TEMPLATES[name] = registered
        self.processor.tokenizer = self.tokenizer
        for k, v in {**MEDIA_DEFAULTS, **(media or {})}.items():
            setattr(self.processor, k, v)
        self.processor.video_processor = _VideoProcessor(self.processor.video_processor)
        self.supervised = SupervisedDatasetProcessor(template=self.template, tokenizer=self.tokenizer,
                                                     processor=self.processor, data_args=self.data_args)

    def encode(self, prompt, response, system="", images=(), videos=()):
        """_encode_data_example -> (input_ids, labels)."""
        return self.supervised._encode_data_example(prompt, response, system, "", list(images), list(videos), [])

    def mm_inputs(self, images=(), videos=()):
        """The plugin's pixel values and grids (numpy)."""
        out = self.template.mm_plugin._get_mm_inputs(list(images), list(videos), [], self.processor)
        return {k: v.numpy() for k, v in out.items() if hasattr(v, "numpy")}

    def read(self, dataset, dataset_dir, media_dir=None):
        """Its dataset_info.json reading and converter on a local file dataset -> aligned examples."""
        import json

        args = DataArguments(template="glm4v", dataset=dataset, dataset_dir=dataset_dir, media_dir=media_dir)
        out = []
        for attr in get_dataset_list(args.dataset, args.dataset_dir):
            convert = get_dataset_converter(attr.formatting, attr, args)
            with open(os.path.join(dataset_dir, attr.dataset_name), encoding="utf-8") as f:
                rows = json.load(f)
            columns = {k for row in rows for k in row}   # the datasets library gives every row every column
            out += [convert({k: row.get(k) for k in columns}) for row in rows]
        return out
