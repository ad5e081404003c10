"""The one exception the processors raise for bad input (a CLI prints its message as a single line)."""


class ProcessorError(ValueError):
    """Bad input to the processor: missing/unreadable media, an impossible size, a mixed image+video chat."""
