"""Stand-in for trl, which LLaMA-Factory's model/loader.py imports at the top for its value-head (reward / PPO)
models only (tests/lf_reference.py puts this folder on sys.path only when no real trl is installed)."""


class AutoModelForCausalLMWithValueHead:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("trl is not installed (a test stand-in)")
