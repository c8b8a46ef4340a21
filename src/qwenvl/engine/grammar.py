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
    """Compiles constraints for one tokenizer and vocabulary (the logits' width)."""

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


_BITS = torch.arange(32, dtype=torch.int32)


def apply_masks(logits: torch.Tensor, rows: Sequence[int], masks: torch.Tensor) -> torch.Tensor:
    """``logits`` with every token a row's mask forbids set to ``-inf`` (a copy; rows not in
    ``rows`` are unchanged). Tokens past the mask (logit rows wider than the tokenizer) are
    forbidden."""
    out = logits.clone()
    index = torch.tensor(list(rows), dtype=torch.long, device=logits.device)
    allowed = ((masks.unsqueeze(-1) >> _BITS) & 1).bool().flatten(1)  # [R, words * 32]
    width = min(out.shape[-1], allowed.shape[1])
    sub = out[index]
    sub[:, :width].masked_fill_(~allowed[:, :width].to(sub.device), float("-inf"))
    sub[:, width:] = float("-inf")
    out[index] = sub
    return out
