"""`method=hf`: Hugging Face `generate` with the same settings, as an outside reference point.

``cache: static`` makes generate use its static KV cache; with the top-level ``compile=true`` its
forward is then compiled too (transformers' own auto-compile, on every device), the fair reference
for a compiled `ar`.
"""

from __future__ import annotations

import torch

from tokctl.decode.base import DecodingMethod, Generation
from tokctl.decode.sampling import Settings
from tokctl.errors import UserError


class HFGenerate(DecodingMethod):
    name = "hf"

    def __init__(self, cache: str = "dynamic"):
        if cache not in ("dynamic", "static"):
            raise UserError(f"method.cache={cache}: choose dynamic or static")
        self.cache = cache

    def setup(self, target, loaded) -> None:
        super().setup(target, loaded)
        self.model = loaded.model
        self.pad_id = loaded.tokenizer.pad_token_id

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], settings: Settings,
                 generator: torch.Generator | None) -> Generation:
        s = settings.sampling
        ids = torch.tensor([prompt_ids], device=self.target.device)
        room = self.target.max_positions - len(prompt_ids)
        kwargs = {"do_sample": not s.greedy}
        if not s.greedy:
            kwargs.update(temperature=s.temperature, top_k=s.top_k or None, top_p=s.top_p)
            if generator is not None:  # HF samples from the global RNG: seed it from ours
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        else:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        if self.cache == "static":
            from transformers import CompileConfig

            kwargs["cache_implementation"] = "static"
            if getattr(self.target, "compiled", False):
                config = CompileConfig(fullgraph=True)
                config._compile_all_devices = True  # transformers compiles on GPUs only otherwise
                kwargs["compile_config"] = config
            else:
                kwargs["disable_compile"] = True
        out = self.model.generate(
            ids, attention_mask=torch.ones_like(ids),
            max_new_tokens=min(settings.max_new_tokens, room),
            eos_token_id=sorted(settings.eos_ids) or None, pad_token_id=self.pad_id, **kwargs)
        new = out[0, len(prompt_ids):].tolist()
        reason = "length"
        for i, t in enumerate(new):
            if t in settings.eos_ids:
                new, reason = new[: i + 1], "eos"
                break
        if reason == "length" and len(new) < settings.max_new_tokens:
            reason = "context"
        return Generation(tokens=new, steps=len(new), finish_reason=reason,
                          accepted_per_step=[1] * len(new))
