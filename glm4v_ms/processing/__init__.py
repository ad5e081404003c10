"""Processors for GLM-4.1V: numpy, Pillow, PyAV, tokenizers and jinja2 only (no MindSpore, no torch)."""
from .chat import Tokenizer, render_chat, split_thinking, strip_thinking
from .errors import ProcessorError
from .image import ImageProcessor, smart_resize
from .processor import Glm4vProcessor
from .video import VideoMetadata, VideoProcessor, load_video, sample_frame_indices

__all__ = [
    "Glm4vProcessor", "ImageProcessor", "ProcessorError", "Tokenizer", "VideoMetadata", "VideoProcessor",
    "load_video", "render_chat", "sample_frame_indices", "smart_resize", "split_thinking", "strip_thinking",
]
