"""The layout policy: how a batch's sequences become the decoder's rows for a given model (padded rows,
packed rows, or one row of prompt groups), chosen per model from what its decoder reads exactly."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from prefopt.data.batching import PaddedSequences
from prefopt.data.packing import PackedSequences, pack, share_prompts
from prefopt.models.logps import CHUNK_TOKENS, model_logps
from prefopt.models.packing_support import PackingSupport, supports_packing

Rows = PaddedSequences | PackedSequences


@dataclass(frozen=True)
class Packing:
    """How a batch's sequences become the decoder's rows (`trainer.layout.packing`, `pack_tokens`,
    `share_prompts`)."""

    mode: bool | str = "auto"  # auto: pack when `supports_packing` says so, else pad | True | False
    pack_tokens: int | None = None  # tokens per packed row; None: the longest sequence of the batch
    width_multiple: int = 1  # packed rows' width rounded up to this (64 under trainer.layout.compile)
    share_prompts: bool = True  # one row of prompt groups where the model takes it (not under compile)

    def packs(self, model, device) -> bool:
        support = self._support(model, device)
        return self.mode is not False and (support.layout is not None or self._shares(support))

    def shares_prompts(self, model, device) -> bool:
        return self.mode is not False and self._shares(self._support(model, device))

    def arrange(self, rows: PaddedSequences, model, device) -> Rows:
        """`rows` as `model` reads them best: one row of prompt groups, else packed rows, else as they are
        (padded)."""
        if self.mode is False:
            return rows
        support = self._support(model, device)
        if self._shares(support):
            return share_prompts(rows)
        if support.layout is None:
            return rows
        one_row = support.layout == "one_row"  # one row holds the batch: attention never spans rows
        budget = int(rows.attention_mask.sum()) if one_row else self.pack_tokens
        return pack(rows, budget, self.width_multiple)

    def logps(self, model, rows: PaddedSequences, chunk_tokens: int = CHUNK_TOKENS) -> Tensor:
        """Summed response log-probs (R,) of padded `rows`, arranged as `model` reads them best."""
        return model_logps(model, self.arrange(rows, model, rows.input_ids.device), chunk_tokens)

    def _shares(self, support: PackingSupport) -> bool:
        # A compiled decoder would recompile for every new set of groups: it gets bucketed packed rows.
        return self.share_prompts and support.shares_prompts and self.width_multiple == 1

    def _support(self, model, device) -> PackingSupport:
        support = supports_packing(model, device)
        if support.layout is None and not self._shares(support) and self.mode is True:
            raise ValueError(
                f"trainer.layout.packing=true: {type(model).__name__} cannot pack: {support.reason}"
            )
        return support
