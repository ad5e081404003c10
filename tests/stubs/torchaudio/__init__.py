"""Stand-in for torchaudio, which LLaMA-Factory's mm_plugin.py imports at the top and uses only for audio
(tests/lf_reference.py puts this folder on sys.path only when no real torchaudio is installed)."""
