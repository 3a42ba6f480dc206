"""The target model as decoding methods see it: one sequence, a KV cache, and three operations.

- ``prefill(ids)``: start a sequence, return the logits after its last token.
- ``forward(tokens, parents)``: run new tokens after the committed prefix in one pass. ``parents``
  makes them a tree (parents[i] is the index of token i's parent among the new tokens, -1 for a
  child of the last committed token); None means a chain. Their KV entries stay pending.
- ``commit(keep)``: keep the pending entries on one root-to-leaf path, drop the rest. The prefix is
  never recomputed.

Two backends share this interface: :class:`FastTarget` (Llama architecture, static cache, lean
forward) and :class:`HFTarget` (any Hugging Face causal LM, DynamicCache, 4D tree masks).
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from tokctl.errors import UserError
from tokctl.models import fast_llama


def tree_positions_and_mask(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth of each node (0 for children of the committed prefix) and the [n, n] ancestor mask
    (True where row i may attend column j: j is i or an ancestor of i). Parents precede children."""
    n = parents.shape[0]
    p = parents.tolist()
    depth = [0] * n
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        mask[i, i] = True
        if p[i] >= 0:
            if p[i] >= i:
                raise ValueError("tree parents must precede their children")
            depth[i] = depth[p[i]] + 1
            mask[i] |= mask[p[i]]
    return torch.tensor(depth, dtype=torch.long), mask


class Target:
    """Common bookkeeping; subclasses implement ``_forward`` and ``_keep``."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.length = 0  # committed tokens
        self._pending = 0
        self.forward_calls = 0

    # --- subclass hooks --------------------------------------------------------------------------
    def _reset(self, capacity: int) -> None:
        raise NotImplementedError

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor | None,
                 last_only: bool) -> torch.Tensor:
        raise NotImplementedError

    def _keep(self, keep: torch.Tensor) -> None:
        raise NotImplementedError

    # --- interface -------------------------------------------------------------------------------
    def prefill(self, ids: Sequence[int] | torch.Tensor, capacity: int | None = None,
                all_logits: bool = False) -> torch.Tensor:
        """Start a sequence; the logits after its last token ([V]), or at every position
        ([T, V]) with ``all_logits``."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).view(-1)
        if ids.numel() == 0:
            raise UserError("empty prompt: nothing to decode from")
        self._reset(capacity or ids.numel() + 256)
        self.length = 0
        self._pending = 0
        logits = self._forward(ids, torch.arange(ids.numel(), device=self.device), None,
                               last_only=not all_logits)
        self.forward_calls = 1
        self.length = ids.numel()
        return logits if all_logits else logits[-1]

    def forward(self, tokens: Sequence[int] | torch.Tensor,
                parents: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        if self._pending:
            raise RuntimeError("commit() the previous forward before the next one")
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device).view(-1)
        n = tokens.numel()
        if parents is None:
            depth, tree_mask = torch.arange(n), None
        else:
            parents = torch.as_tensor(parents, dtype=torch.long).view(-1).cpu()
            depth, tree_mask = tree_positions_and_mask(parents)
            if bool((parents == torch.arange(n) - 1).all()):
                tree_mask = None  # a chain: plain causal attention
            else:
                tree_mask = tree_mask.to(self.device)
        positions = (depth + self.length).to(self.device)
        logits = self._forward(tokens, positions, tree_mask, last_only=False)
        self._pending = n
        self.forward_calls += 1
        return logits

    def truncate(self, length: int) -> None:
        """Forget committed tokens beyond ``length`` (a draft model rolling back its guesses)."""
        if self._pending:
            raise RuntimeError("commit() the previous forward before truncating")
        if not 0 < length <= self.length:
            raise ValueError(f"cannot truncate a sequence of {self.length} tokens to {length}")
        self._truncate(length)
        self.length = length

    def _truncate(self, length: int) -> None:
        pass  # the static cache simply overwrites slots beyond the committed length

    def commit(self, keep: Sequence[int] | torch.Tensor) -> None:
        keep = torch.as_tensor(keep, dtype=torch.long, device=self.device).view(-1)
        self._keep(keep)
        self.length += int(keep.numel())
        self._pending = 0


class FastTarget(Target):
    backend = "fast"

    def __init__(self, model, tokenizer, attention=None, exit_layer: int | None = None):
        super().__init__(model, tokenizer)
        self.fast = fast_llama.FastLlama(model, attention=attention, exit_layer=exit_layer)
        self.cache = self.fast.new_cache(512)

    def _reset(self, capacity: int) -> None:
        self.cache.grow(capacity)

    def _forward(self, tokens, positions, tree_mask, last_only):
        return self.fast.forward(tokens, positions, self.cache, self.length, tree_mask,
                                 last_only=last_only)

    def _keep(self, keep):
        self.cache.keep(self.length, keep)


class HFTarget(Target):
    """Any HF causal LM. Trees go through a custom 4D attention mask, which transformers passes to
    the attention implementation as given."""

    backend = "hf"

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        self.cache = None
        # transformers 5 renames past_key_values= to cache=; use whichever this model takes.
        params = inspect.signature(type(model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def _reset(self, capacity: int) -> None:
        from transformers import DynamicCache

        # No config: every layer keeps every position (a config would make sliding-window layers
        # drop old entries, and committing tree paths by index needs full-length caches). The
        # sliding window is applied through the attention masks instead.
        self.cache = DynamicCache()

    @torch.inference_mode()
    def _forward(self, tokens, positions, tree_mask, last_only):
        n = tokens.numel()
        kwargs = {}
        if tree_mask is not None:
            full = torch.cat([torch.ones(n, self.length, dtype=torch.bool, device=self.device),
                              tree_mask], dim=1)
            kwargs["attention_mask"] = self._tree_masks(full, positions)
        kwargs[self._cache_kw] = self.cache
        out = self.model(input_ids=tokens[None], position_ids=positions[None], use_cache=True,
                         logits_to_keep=1 if last_only else 0, **kwargs)
        return out.logits[0]

    def _as_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        if getattr(self.model.config, "_attn_implementation", "sdpa") == "eager":
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)[None, None]
        return allowed[None, None]

    def _tree_masks(self, allowed: torch.Tensor, positions: torch.Tensor):
        """One 4D mask, or one per attention type for models mixing full and sliding-window
        layers (Gemma 3): there a key is also hidden once it is ``sliding_window`` positions back."""
        cfg = self.model.config
        types = set(getattr(cfg, "layer_types", None) or [])
        window = getattr(cfg, "sliding_window", None)
        if "sliding_attention" not in types or not window:
            return self._as_mask(allowed)
        key_pos = torch.cat([torch.arange(self.length, device=self.device), positions])
        near = (positions[:, None] - key_pos[None, :]) < window
        return {t: self._as_mask(allowed & near if t == "sliding_attention" else allowed)
                for t in types}

    def _truncate(self, length: int) -> None:
        self.cache.crop(length - self.length)

    def _keep(self, keep):
        n_pending = self._pending
        k = int(keep.numel())
        if k == 0 or bool((keep == torch.arange(k, device=keep.device)).all()):
            if n_pending - k:
                self.cache.crop(-(n_pending - k))
            return
        index = torch.cat([torch.arange(self.length, device=self.device), keep + self.length])
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)


BACKENDS = ("auto", "fast", "hf")


def make_target(model, tokenizer, backend: str = "auto", attention=None,
                exit_layer: int | None = None) -> Target:
    if exit_layer:
        n_layers = model.config.num_hidden_layers
        if not fast_llama.supports(model):
            raise UserError(f"early exit (draft_model=self:N) needs a Llama-architecture model, "
                            f"not {model.config.model_type}")
        if not 1 <= exit_layer < n_layers:
            raise UserError(f"draft_model=self:{exit_layer}: choose N from 1 to {n_layers - 1}")
        return FastTarget(model, tokenizer, attention=attention, exit_layer=exit_layer)
    if backend not in BACKENDS:
        raise UserError(f"model.backend={backend} is not one of {', '.join(BACKENDS)}")
    if backend == "fast" and not fast_llama.supports(model):
        raise UserError(f"model.backend=fast supports {', '.join(fast_llama.SUPPORTED)} models, not "
                        f"{model.config.model_type}; use model.backend=hf")
    if backend == "fast" or (backend == "auto" and fast_llama.supports(model)):
        return FastTarget(model, tokenizer, attention=attention)
    return HFTarget(model, tokenizer)
