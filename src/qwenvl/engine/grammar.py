"""Grammar-constrained sampling on llguidance: one matcher per sequence, masks per step.

``Grammars`` (one per engine) turns a :class:`~qwenvl.structured.StructuredOutput` into an
llguidance matcher: the grammar is compiled and checked once per distinct constraint (cached by
its canonical text) and each sequence gets a copy that advances with its tokens. Each step the
sampling rows of constrained sequences get a bitmask of the tokens that keep the reply in the
language; :func:`apply_masks` sets the others to ``-inf`` before temperature, top-k and top-p,
so every sampling option draws from the constrained distribution. Computing the masks releases
the GIL, so the engine starts them on a thread while the model step runs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from qwenvl.errors import PromptError
from qwenvl.structured import StructuredOutput
from qwenvl.tokenizer import Tokenizer

CACHE_SIZE = 256  # distinct compiled constraints kept


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a declared dependency
        raise PromptError("structured outputs need llguidance: pip install llguidance") from None
    return llguidance


class Grammars:
    """Compiles constraints for one tokenizer (masks cover its vocabulary; logit columns past
    it are forbidden by :func:`apply_masks`)."""

    def __init__(self, tokenizer: Tokenizer, eos: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.eos = sorted(eos)
        self._llg_tokenizer: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def llg_tokenizer(self) -> Any:
        if self._llg_tokenizer is None:  # built on first use: most engines never need it
            llg = _llguidance()
            self._llg_tokenizer = llg.LLTokenizer(
                self.tokenizer.backend.to_str(), eos_token=self.eos
            )
        return self._llg_tokenizer

    def matcher(self, structured: StructuredOutput) -> Any:
        """A fresh matcher for ``structured``; raises ``PromptError`` naming what the grammar
        engine refused (an unimplemented JSON Schema keyword, a bad regex, a Lark error)."""
        key = structured.key()
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
                return template.deep_copy()
        llg = _llguidance()
        grammar = llg.LLMatcher.grammar_from_lark(structured.lark())
        failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.llg_tokenizer)
        if failed:
            raise PromptError(f"{structured.kind}: {_first_line(messages[0])}")
        template = llg.LLMatcher(self.llg_tokenizer, grammar, log_level=0)
        if template.is_error():
            raise PromptError(f"{structured.kind}: {_first_line(template.get_error())}")
        with self._lock:
            self._compiled[key] = template
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        return template.deep_copy()

    @property
    def cached(self) -> int:
        return len(self._compiled)


def _first_line(message: str) -> str:
    """llguidance's message without the grammar listing it appends."""
    text = message.strip().splitlines()[0] if message.strip() else "invalid grammar"
    return text.split(": ", 1)[1] if text.startswith("at ") and ": " in text else text


def compute_masks(matchers: Sequence[Any]) -> torch.Tensor:
    """``[len(matchers), words]`` int32 bitmasks of the tokens each matcher allows next."""
    return torch.stack(
        [torch.frombuffer(bytearray(m.compute_bitmask()), dtype=torch.int32) for m in matchers]
    )


_LANES = np.arange(32)


def _set_bits(words: np.ndarray) -> np.ndarray:
    """Indices of the 1 bits of a packed row (bit ``j`` of word ``i`` is index ``32 i + j``),
    unpacking only its nonzero words."""
    nonzero = np.flatnonzero(words)
    bits = np.unpackbits(words[nonzero].view(np.uint8), bitorder="little").reshape(-1, 32)
    return (nonzero[:, None] * 32 + _LANES)[bits.astype(bool)]


@torch.inference_mode()  # the step's logits are inference tensors
def apply_masks(logits: torch.Tensor, rows: Sequence[int], masks: torch.Tensor) -> torch.Tensor:
    """Set every token a row's mask forbids to ``-inf``, in place (the step's own logits; rows
    not in ``rows`` are unchanged) and return ``logits``. Tokens past the mask (logit rows wider
    than the tokenizer) are forbidden. Each row touches only the smaller side: inside a JSON
    string nearly every token is allowed, between fields a handful."""
    packed = masks.numpy().view(np.uint32)
    vocab = logits.shape[-1]
    for k, row in enumerate(rows):
        line, words = logits[row], packed[k]
        allowed = int(np.unpackbits(words.view(np.uint8)).sum())
        if allowed * 2 < vocab:
            keep = torch.from_numpy(_set_bits(words)).to(logits.device)
            values = line[keep]
            line.fill_(float("-inf"))
            line[keep] = values
        else:
            drop = _set_bits(~words)
            drop = torch.from_numpy(drop[drop < vocab]).to(logits.device)
            line.index_fill_(0, drop, float("-inf"))
            line[32 * len(words) :] = float("-inf")
    return logits
