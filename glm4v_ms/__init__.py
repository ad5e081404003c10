"""glm4v_ms: GLM-4.1V-9B-Thinking and GLM-4.5V in MindSpore, for Ascend NPUs and CPU.

The model imports MindSpore; the processors do not. Both are loaded on first use, so that
`from glm4v_ms import Glm4vProcessor` works on a host without MindSpore (the parity harness's reference side).
"""
__version__ = "0.1.0"
__all__ = ["Glm4vForConditionalGeneration", "Glm4vMoeForConditionalGeneration", "AutoModelForImageTextToText",
           "Glm4vProcessor", "Glm4vConfig", "PromptCache"]


def __getattr__(name):
    if name in ("Glm4vForConditionalGeneration", "Glm4vMoeForConditionalGeneration", "AutoModelForImageTextToText"):
        from . import model
        return getattr(model, name)
    if name == "PromptCache":
        from .reuse import PromptCache
        return PromptCache
    if name == "Glm4vProcessor":
        from .processing import Glm4vProcessor
        return Glm4vProcessor
    if name == "Glm4vConfig":
        from .config import Glm4vConfig
        return Glm4vConfig
    raise AttributeError(name)
