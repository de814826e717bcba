"""Stand-in for ``sglang.srt.managers`` (see ``sglang/__init__.py``)."""
