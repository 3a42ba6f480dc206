"""`method=beam`: beam search of width k (Hugging Face `generate`), all k beams returned as drafts.

The deterministic k-draft baseline for Superposed Decoding: one batched forward of k sequences
per step. Sampling settings are ignored.
"""

from __future__ import annotations

import torch

from tokctl.decode.base import Generation
from tokctl.decode.methods.hf import HFGenerate
from tokctl.decode.sampling import Settings
from tokctl.errors import UserError


class BeamSearch(HFGenerate):
    """Hugging Face ``generate`` like ``method=hf`` (its setup: the model and pad id), with beams."""

    name = "beam"

    def __init__(self, k: int = 3, length_penalty: float = 1.0):
        if int(k) < 1:
            raise UserError(f"k={k}: the beam width must be at least 1")
        self.k = int(k)
        self.length_penalty = float(length_penalty)

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], settings: Settings,
                 generator: torch.Generator | None) -> Generation:
        ids = torch.tensor([prompt_ids], device=self.model.device)
        room = min(settings.max_new_tokens, self.target.max_positions - len(prompt_ids))
        out = self.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=room, do_sample=False,
            num_beams=self.k, num_return_sequences=self.k, length_penalty=self.length_penalty,
            early_stopping=True, eos_token_id=sorted(settings.eos_ids) or None,
            pad_token_id=self.pad_id, temperature=None, top_k=None, top_p=None)
        drafts, reasons = [], []
        for row in out[:, len(prompt_ids):].tolist():
            seq, reason = [], "length"
            for t in row:
                seq.append(t)
                if t in settings.eos_ids:
                    reason = "eos"
                    break
            drafts.append(seq)
            reasons.append(reason)
        return Generation(tokens=drafts[0], steps=max(len(d) for d in drafts),
                          finish_reason=reasons[0], accepted_per_step=[1] * len(drafts[0]),
                          extra={"drafts": drafts})

    def run_info(self):
        return {"k": self.k, "length_penalty": self.length_penalty}
