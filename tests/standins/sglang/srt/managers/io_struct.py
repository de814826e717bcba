"""Stand-in for ``sglang.srt.managers.io_struct.EmbeddingReqInput`` (0.5.17), reduced to the
fields the embedder uses; the batch/single rules are the real ``normalize_batch_and_arguments``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EmbeddingReqInput:
    rid: str | list[str] | None = field(default=None, kw_only=True)
    text: list[str] | str | None = None
    input_ids: list[list[int]] | list[int] | None = None

    def normalize_batch_and_arguments(self) -> None:
        if self.text is None and self.input_ids is None:
            raise ValueError("At least one of text, input_ids, or image should be provided")
        if self.text is not None and self.input_ids is not None:
            raise ValueError("text and input_ids cannot be provided at the same time")
        if self.text is not None:
            self.is_single = not isinstance(self.text, list)
            self.batch_size = 1 if self.is_single else len(self.text)
        else:
            # the real check: a batch is a list whose first item is a list (not a tuple/array)
            self.is_single = not isinstance(self.input_ids[0], list)
            self.batch_size = 1 if self.is_single else len(self.input_ids)
