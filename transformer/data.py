"""Training data with nothing to download: byte-level text corpora and synthetic transduction tasks.

Text (for :class:`~transformer.TransformerLM`): by default the Python standard library's own ``.py``
files, which exist on every machine with Python, or any text files the user names. Each file becomes
``BOS bytes... EOS`` in the byte vocabulary of :class:`~transformer.tokenizer.ByteTokenizer` (259 ids);
the files are joined in a deterministic order and the last ``val_fraction`` of the stream is held out.
:class:`LMBatcher` draws random windows from a split; :func:`unigram_entropy` gives the loss of the best
model that knows only byte frequencies, the baseline a language model must beat.

Tasks (for the encoder-decoder :class:`~transformer.Transformer`): :func:`task_batch` draws source
strings and their copy, reversal or sorted version, with BOS/EOS and padding, in the byte vocabulary.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from pathlib import Path

import torch

from .tokenizer import BOS_ID, EOS_ID, PAD_ID

TASKS = ("copy", "reverse", "sort")
# Directories of the standard library that are not its own source: third-party packages and test data
# (the test suite holds deliberately malformed files, e.g. for the tokenizer's encoding tests).
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
# Symbols of the transduction tasks: lowercase ASCII letters, readable when decoded.
TASK_ALPHABET = tuple(range(ord("a"), ord("z") + 1))


# ---------------------------------------------------------------------------------------------------
# Text corpora
# ---------------------------------------------------------------------------------------------------
def stdlib_files() -> list[Path]:
    """The standard library's own ``.py`` files (no ``site-packages``, no test suites), sorted by their
    path relative to ``sysconfig.get_paths()["stdlib"]`` so that every run sees the same order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        found.extend(Path(folder, f) for f in files if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


@dataclasses.dataclass
class Corpus:
    """A tokenized text corpus split into training and validation streams.

    Attributes:
        train, val: int16 token ids ``(num_tokens,)``, each file ``BOS bytes... EOS``; ``val`` is the tail
            of the joined stream.
        sources: the files read, in order (the last one may have been cut by the byte cap).
        name: ``"stdlib"`` or ``"files"``.
    """

    train: torch.Tensor
    val: torch.Tensor
    sources: list[str]
    name: str

    @property
    def num_bytes(self) -> int:
        """Tokens in both splits, BOS/EOS included (one token per byte)."""
        return self.train.numel() + self.val.numel()

    def describe(self) -> str:
        return (f"{self.name}: {len(self.sources)} files, {self.num_bytes / 1e6:.2f} MB "
                f"({self.train.numel():,} train / {self.val.numel():,} val tokens)")


def load_corpus(files=None, *, max_bytes: int | None = None, val_fraction: float = 0.05) -> Corpus:
    """Read ``files`` (default: :func:`stdlib_files`) into a byte-level :class:`Corpus`.

    Args:
        files: paths of text files (any encoding: bytes are bytes), or None for the standard library.
        max_bytes: stop after this many tokens in all (the last file is cut); None reads everything.
        val_fraction: share of the joined stream held out for validation, in (0, 1).

    Raises ``ValueError`` for a bad fraction or cap, or when the text is too short to split;
    ``FileNotFoundError`` for a missing file.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_bytes is not None and max_bytes < 2:
        raise ValueError(f"max_bytes must be None or >= 2, got {max_bytes}")
    paths = [Path(f) for f in files] if files else stdlib_files()
    chunks, sources, total = [], [], 0
    for path in paths:
        tokens = _file_tokens(path)
        if max_bytes is not None:
            tokens = tokens[: max_bytes - total]
        chunks.append(tokens)
        sources.append(str(path))
        total += tokens.numel()
        if max_bytes is not None and total >= max_bytes:
            break
    stream = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int16)
    num_val = int(stream.numel() * val_fraction)
    if num_val < 2 or stream.numel() - num_val < 2:
        raise ValueError(f"corpus too short to split: {stream.numel()} tokens from {len(sources)} files")
    return Corpus(stream[:-num_val], stream[-num_val:], sources, "files" if files else "stdlib")


def _file_tokens(path: Path) -> torch.Tensor:
    """``BOS bytes... EOS`` of one file, int16 ``(file_size + 2,)``."""
    raw = path.read_bytes()
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    marks = torch.tensor([BOS_ID, EOS_ID], dtype=torch.int16)
    return torch.cat([marks[:1], data.to(torch.int16), marks[1:]])


def unigram_entropy(tokens: torch.Tensor, vocab_size: int = 259) -> float:
    """Entropy in nats per token of the empirical token (byte) distribution of ``tokens``.

    The cross-entropy on ``tokens`` of the best model that ignores context (one that even knew these
    frequencies in advance), so the loss a language model must get below to have learned anything
    beyond byte frequencies. ``exp`` of it is the unigram perplexity; divide by ``ln 2`` for bits/byte.
    """
    counts = torch.bincount(tokens.long().flatten(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


class LMBatcher:
    """Random windows of a token stream, for next-token prediction.

    Each batch is ``(batch_size, seq_len + 1)`` int64: the model reads ``[:, :-1]`` and is scored on
    ``[:, 1:]`` (the layout of :func:`~transformer.training.compute_loss`). Starts are drawn uniformly
    with ``generator``, so a seeded generator gives the same batches on every run.
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, *, device=None):
        if tokens.numel() < seq_len + 2:
            raise ValueError(f"a window of {seq_len + 1} tokens needs a stream longer than {tokens.numel()}")
        self.tokens, self.batch_size, self.seq_len, self.device = tokens, batch_size, seq_len, device
        self._offsets = torch.arange(seq_len + 1)

    def batch(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One batch of windows, ``(batch_size, seq_len + 1)`` int64 on ``device``."""
        starts = torch.randint(0, self.tokens.numel() - self.seq_len, (self.batch_size, 1), generator=generator)
        return self.tokens[starts + self._offsets].long().to(self.device)

    def fixed_batches(self, count: int, seed: int) -> list[torch.Tensor]:
        """``count`` batches drawn with a generator seeded by ``seed``: the same set at every evaluation."""
        generator = torch.Generator().manual_seed(seed)
        return [self.batch(generator) for _ in range(count)]


# ---------------------------------------------------------------------------------------------------
# Transduction tasks
# ---------------------------------------------------------------------------------------------------
def task_target(task: str, src: list[int]) -> list[int]:
    """The output the task asks for: ``src`` itself (copy), reversed, or sorted."""
    if task == "copy":
        return list(src)
    if task == "reverse":
        return src[::-1]
    if task == "sort":
        return sorted(src)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def task_batch(task: str, batch_size: int, max_len: int, *, min_len: int = 1,
               alphabet: tuple[int, ...] = TASK_ALPHABET, generator: torch.Generator | None = None,
               device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of a sequence-transduction task in the byte vocabulary, ready for :func:`compute_loss`.

    Each example draws a length in ``[min_len, max_len]`` and that many symbols from ``alphabet`` (byte
    ids; lowercase letters by default). Returns ``(src, tgt)`` int64:

    * ``src`` ``(batch_size, max_len + 2)``: BOS, the symbols, EOS, then PAD (as
      ``ByteTokenizer.encode(text, bos=True, eos=True)``, what ``python -m transformer.generate --src`` feeds);
    * ``tgt`` ``(batch_size, max_len + 2)``: BOS, the task's output (:func:`task_target`), EOS, then PAD.

    The model reads ``tgt[:, :-1]`` and is scored on ``tgt[:, 1:]``; set ``config.pad_id = PAD_ID`` so
    that padding is masked out of attention and ignored by the loss.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    lengths = torch.randint(min_len, max_len + 1, (batch_size,), generator=generator).tolist()
    symbols = torch.tensor(alphabet)[torch.randint(0, len(alphabet), (batch_size, max_len), generator=generator)]
    src = torch.full((batch_size, max_len + 2), PAD_ID, dtype=torch.long)
    tgt = torch.full((batch_size, max_len + 2), PAD_ID, dtype=torch.long)
    for row, (length, seq) in enumerate(zip(lengths, symbols.tolist())):
        seq = seq[:length]
        src[row, : length + 2] = torch.tensor([BOS_ID] + seq + [EOS_ID])
        tgt[row, : length + 2] = torch.tensor([BOS_ID] + task_target(task, seq) + [EOS_ID])
    return src.to(device), tgt.to(device)

