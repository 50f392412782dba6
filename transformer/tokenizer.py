"""A byte-level tokenizer: every text, in every language, with nothing to download or train.

Ids 0..255 are the UTF-8 bytes; 256 is PAD, 257 BOS (start of sequence), 258 EOS (end of sequence), so
``vocab_size`` is :data:`~transformer.config.BYTE_VOCAB_SIZE` (259). Decoding drops the special ids and
replaces invalid UTF-8 (a sampled model can emit any byte) with U+FFFD.
"""

from __future__ import annotations

import torch

from .config import BYTE_VOCAB_SIZE

PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
assert BYTE_VOCAB_SIZE == 259


class ByteTokenizer:
    """``encode(text) -> list[int]`` and ``decode(ids) -> str`` over UTF-8 bytes plus PAD/BOS/EOS."""

    vocab_size = BYTE_VOCAB_SIZE
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return ([BOS_ID] if bos else []) + list(text.encode("utf-8")) + ([EOS_ID] if eos else [])

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
