"""Prefix files: the native safetensors format, PEFT adapters, the checks every upload passes, and the
size limits. ``source.load_prefix_source`` reads whichever a path holds."""
