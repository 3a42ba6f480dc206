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

from tokctl import measure
from tokctl.errors import UserError
from tokctl.kernels.tree_attention import tree_attention_exact
from tokctl.models import fast_llama


def check_parents(parents: list[int]) -> None:
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"tree parents must precede their children (node {i} has parent {p})")


def tree_positions_and_mask(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth of each node (0 for children of the committed prefix) and the [n, n] ancestor mask
    (True where row i may attend column j: j is i or an ancestor of i). Parents precede children.
    Built on the parents' device without a loop over nodes (:func:`fast_llama.tree_ancestors`)."""
    check_parents(parents.tolist())
    mask = fast_llama.tree_ancestors(parents)
    return mask.sum(1) - 1, mask


class Target:
    """Common bookkeeping; subclasses implement ``_reset``, ``_run`` and ``_keep``."""

    compiled = False
    exact = False

    def __init__(self, model, tokenizer, vocab_size: int | None = None,
                 max_positions: int | None = None):
        """``vocab_size``/``max_positions``: given for a model that is not a Hugging Face one
        (read from its head and config otherwise)."""
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = vocab_size or model.get_output_embeddings().weight.shape[0]
        self.max_positions = max_positions or int(
            getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.length = 0  # committed tokens
        self._pending = 0
        self.forward_calls = 0
        self.prefill_s = 0.0  # seconds spent in prefill() since the caller last zeroed it
        self.prompt: torch.Tensor | None = None
        # share_prefill: a prefill of the prompt the cache already holds is not recomputed (the
        # long-context runs, where one prefill costs more than the whole decode): its logits and
        # the time it took are kept, and that time is charged again to whoever reuses it
        # (prefill_s and shared_prefill_s), so per-method totals stay comparable.
        self.share_prefill = False
        self.shared_prefill_s = 0.0
        self._held: tuple[torch.Tensor, float] | None = None  # (last logits, seconds)

    # --- subclass hooks --------------------------------------------------------------------------
    def _reset(self, capacity: int) -> None:
        raise NotImplementedError

    def _run(self, tokens: torch.Tensor, parents: list[int] | None, last_only: bool) -> torch.Tensor:
        """Logits for ``tokens`` (on the device) after the committed prefix; ``parents`` None
        means a chain."""
        raise NotImplementedError

    def _keep(self, keep: list[int]) -> None:
        raise NotImplementedError

    # --- interface -------------------------------------------------------------------------------
    def prefill(self, ids: Sequence[int] | torch.Tensor, capacity: int | None = None,
                all_logits: bool = False) -> torch.Tensor:
        """Start a sequence; the logits after its last token ([V]), or at every position
        ([T, V]) with ``all_logits``."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).view(-1)
        if ids.numel() == 0:
            raise UserError("empty prompt: nothing to decode from")
        capacity = capacity or ids.numel() + 256
        self._pending = 0
        self.forward_calls = 1
        if not all_logits and self._holds(ids, capacity):
            logits, seconds = self._held
            self.length = ids.numel()
            self.prefill_s += seconds
            self.shared_prefill_s += seconds
            return logits.clone()
        self._reset(capacity)
        self.length = 0
        # Timed apart so that long-context runs can report decode speed without the prefill.
        seconds, logits = measure.timed(lambda: self._run(ids, None, last_only=not all_logits),
                                        self.device)
        self.prefill_s += seconds
        self.prompt = ids  # what the cache's first slots hold, until the next prefill
        self.length = ids.numel()
        self._held = (logits[-1].clone(), seconds) if self.share_prefill else None
        return logits if all_logits else logits[-1]

    def _holds(self, ids: torch.Tensor, capacity: int) -> bool:
        """Whether the cache still holds ``ids``' prefill, with room for ``capacity``: every
        method writes only past its prompt, so the prompt's slots survive a generation."""
        return (self.share_prefill and self._held is not None and self.prompt is not None
                and self.length >= ids.numel() and torch.equal(self.prompt, ids)
                and self._room(capacity))

    def _room(self, capacity: int) -> bool:
        return False  # a cache that is rebuilt by every prefill holds nothing to share

    def forward(self, tokens: Sequence[int] | torch.Tensor,
                parents: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Logits ([n, V]) for ``tokens`` after the committed prefix, as a tree when ``parents``
        is given (else a chain). The tree's positions and mask are built on the device."""
        if self._pending:
            raise RuntimeError("commit() the previous forward before the next one")
        tokens = torch.as_tensor(tokens, dtype=torch.long).view(-1).to(self.device)
        n = tokens.numel()
        if parents is not None:
            parents = [int(p) for p in (parents.tolist() if torch.is_tensor(parents) else parents)]
            if len(parents) != n:
                raise ValueError(f"{n} tokens but {len(parents)} parents")
            check_parents(parents)
            if parents == list(range(-1, n - 1)):
                parents = None  # a chain: plain causal attention
        logits = self._run(tokens, parents, last_only=False)
        self._pending = n
        self.forward_calls += 1
        return logits

    def step(self, token: int) -> torch.Tensor:
        """One token after the committed prefix, committed at once: its logits ([V]). The loop
        of `ar` and of a draft model's chain; a target may run it leaner than a forward."""
        logits = self.forward([token])[0]
        self.commit([0])
        return logits

    def truncate(self, length: int) -> None:
        """Forget committed tokens beyond ``length`` (a draft model rolling back its guesses)."""
        if self._pending:
            raise RuntimeError("commit() the previous forward before truncating")
        if not 0 < length <= self.length:
            raise ValueError(f"cannot truncate a sequence of {self.length} tokens to {length}")
        self._truncate(length)
        self.length = length
        if self.prompt is not None and length < self.prompt.numel():
            self._held = None  # the prompt's own slots may be written next: nothing left to share

    def _truncate(self, length: int) -> None:
        pass  # the static cache simply overwrites slots beyond the committed length

    def commit(self, keep: Sequence[int] | torch.Tensor) -> None:
        """Keep the pending entries ``keep`` (indices into the last forward, root to leaf)."""
        keep = [int(k) for k in (keep.tolist() if torch.is_tensor(keep) else keep)]
        self._keep(keep)
        self.length += len(keep)
        self._pending = 0


def _configure_dynamo() -> None:
    """One graph per block size (and cache capacity): allow more than dynamo's default 8."""
    import torch._dynamo.config as dc

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), 64))
    if hasattr(dc, "accumulated_recompile_limit"):
        dc.accumulated_recompile_limit = max(dc.accumulated_recompile_limit, 512)


def compile_step(step, device: torch.device, freeze: bool = True, backend="inductor",
                 dynamic: bool = False):
    """``torch.compile`` of the lean step, whole (``fullgraph``): Inductor on the CPU, with
    ``dynamic`` shapes if asked; CUDA graphs on a GPU (``reduce-overhead``, static shapes, which
    CUDA graphs replay). On the CPU with ``freeze``, the weights
    are frozen into the graph as constants (Inductor then prepacks every linear layer for oneDNN
    once, bf16 through AMX, instead of reading plain weights in every call)."""
    _configure_dynamo()
    if device.type == "cuda":
        mode = {"mode": "reduce-overhead"} if backend == "inductor" else {"backend": backend}
        return torch.compile(step, fullgraph=True, dynamic=False, **mode)
    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend=backend)
    import torch._inductor.config as inductor_config
    import torch.fx.experimental._config as shape_config

    def run(*args, **kwargs):
        # Dynamo reads these flags while it traces, so they are set around the call (torch.compile's
        # options reach Inductor only), and for these calls alone. Freezing keeps the parameters
        # out of the graph's inputs; set globally it would also freeze HF generate's compiled
        # static cache (a buffer) into a constant. Duck sizing off: it would give a block of as
        # many tokens as some model dimension (2 kv heads, say) that dimension's symbol, and then
        # specialise the block size to it.
        with inductor_config.patch(freezing=freeze), shape_config.patch(use_duck_shape=not dynamic):
            return compiled(*args, **kwargs)

    return run


class FastTarget(Target):
    """The lean forward over a fixed-capacity cache. ``compile``: steps run through
    ``torch.compile``. On a CPU the compiled step takes any block size and attention window
    (dynamic shapes: one graph for a single token, one for every larger block). On a GPU, where a
    CUDA graph replays one fixed shape, blocks are padded to :data:`fast_llama.BUCKETS` and
    attend over the whole capacity (a few fixed shapes). :meth:`compile_now` compiles them all
    before anything is timed. ``exact``: a row's result cannot depend on how many rows run
    beside it or where its tree puts its ancestors (batch invariance): attention runs in float64
    (:func:`tree_attention_exact`), and every block, a one-token ``ar`` step included, is padded
    to one size (``exact_block``) unless the weights are prepacked (bf16 matmul kernels round
    differently for 1 and for n rows; packed ones do not).
    ``compile_backend``: Inductor for real runs; tests check graph capture with a cheaper one."""

    backend = "fast"

    def __init__(self, model, tokenizer, attention=None, exit_layer: int | None = None,
                 compile: bool = False, exact: bool = False, exact_block: int = 32,
                 compile_backend: str = "inductor", adapter=None):
        super().__init__(model, tokenizer)
        self.exact = bool(exact)
        if self.exact and attention is None:
            attention = tree_attention_exact
        self.fast = fast_llama.FastLlama(model, attention=attention, exit_layer=exit_layer,
                                         adapter=adapter)
        self.cache = self.fast.new_cache(1024)
        self.compiled = bool(compile)
        self.static_shapes = self.compiled and self.device.type == "cuda"
        # Inductor packs a frozen weight for the row count its graph is compiled for: the
        # one-token graph (dynamic shapes specialise size 1) gets oneDNN's one-row bf16 kernel,
        # which on a CPU reads weights at a third of the rate of the multi-row (AMX) kernel the
        # dynamic graph gets (SmolLM2, 2 threads: 50 ms a one-token step against 39 ms for two
        # rows). So compiled bf16 steps on a CPU take at least two rows, the second thrown away.
        self.min_rows = (2 if self.compiled and not self.static_shapes
                         and self.dtype == torch.bfloat16 else 1)
        self.max_block = None  # the most tokens one step may take and keep its shape
        # Prepacked bf16 linears compute a row the same whatever rows run with it, so exact steps
        # need no padded rows there: attention in float64 does the rest.
        self.pad_rows = self.exact and not getattr(model.config, "tokctl_prepacked", False)
        if self.pad_rows:
            self.buckets = (int(exact_block),)
            self.max_block = int(exact_block)
        else:
            self.buckets = fast_llama.BUCKETS if self.static_shapes else None
        self._step = (compile_step(self.fast.step, self.device, backend=compile_backend,
                                   dynamic=not self.static_shapes)
                      if self.compiled else self.fast.step)
        self._mark_cache()

    def compile_now(self) -> int:
        """Run every graph a compiled step can take once (a dummy sequence, nothing kept), so
        that no timed step compiles. Returns the number of block sizes run."""
        if not self.compiled:
            return 0
        sizes = self.buckets or sorted({max(1, self.min_rows), 2})
        self.prefill(list(range(4)), capacity=4 + max(sizes))
        for n in sizes:
            self.forward(list(range(n)), None)
            self.commit([])
        self.prompt, self._held = None, None
        return len(sizes)

    def _mark_cache(self) -> None:
        if self.compiled and self.device.type == "cuda":
            # CUDA graphs replay on fixed addresses: the cache is mutated in place, never moved.
            for t in self.cache.tensors():
                torch._dynamo.mark_static_address(t)

    def _need(self, capacity: int) -> int:
        # Room for the largest padded block after the last committed token.
        return capacity + (self.buckets[-1] if self.buckets else self.min_rows - 1)

    def _room(self, capacity: int) -> bool:
        return self._need(capacity) <= self.cache.capacity

    def _reset(self, capacity: int) -> None:
        # Capacities are powers of two so that a compiled step meets few distinct shapes.
        need = self._need(capacity)
        if need > self.cache.capacity:
            self.cache.grow(1 << (need - 1).bit_length())
            self._mark_cache()

    @torch.no_grad()
    def _run(self, tokens, parents, last_only):
        n = tokens.numel()
        if parents is None:
            parents = list(range(-1, n - 1))
        prefill = self.length == 0
        chunk = self.buckets[-1] if self.buckets else fast_llama.BUCKETS[-1]
        if (self.buckets is None and not self.compiled) or prefill or (
                n > chunk and parents != list(range(-1, n - 1))):
            # A prefill runs eagerly even when steps are compiled or padded: prompts come in every
            # length, compiling the largest blocks for one call per prompt costs more than it
            # saves, and `ar` and the methods share the prefill, so exactness does not need it.
            # Eager: one block exactly as long as needed, attention over the live slots only.
            return self._block(tokens, parents, 0, n, pad_to=n, window=self.length + n,
                               last_only=last_only, step=self.fast.step)
        # Compiled or padded: chunks of at most the largest bucket (a chain: each chunk sees the
        # ones before it as its prefix), each padded to its bucket where shapes are fixed.
        outs = []
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            m = hi - lo
            b = fast_llama.bucket(m, self.buckets) if self.buckets else max(m, self.min_rows)
            cparents = [p - lo if p >= lo else -1 for p in parents[lo:hi]]
            window = self.cache.capacity if self.static_shapes else self.length + lo + b
            outs.append(self._block(tokens[lo:hi], cparents, lo, m, pad_to=b, window=window))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return out[-1:] if last_only else out

    def _block(self, tokens, parents, offset, m, pad_to, window, last_only=False, step=None):
        step = step or self._step
        if self.length + offset + pad_to > self.cache.capacity:
            raise RuntimeError("the KV cache is full: prefill() with a larger capacity")
        pad = pad_to - m
        if pad:
            tokens = torch.cat([tokens, tokens.new_zeros(pad)])
            parents = parents + [-1] * pad  # padding rows see the prefix and themselves only
        elif tokens._base is not None:
            # Always a tensor of its own: Dynamo guards on whether an input is a view, and a
            # compiled step fed a slice one step and a fresh tensor the next would recompile.
            tokens = tokens.clone()
        par = torch.tensor(parents, dtype=torch.long).to(self.device, non_blocking=True)
        start = torch.tensor(self.length + offset, dtype=torch.long).to(self.device,
                                                                          non_blocking=True)
        if last_only:  # eager prefill: the head for the last row only
            return step(tokens, par, start, self.cache.keys, self.cache.values, window,
                        last_only=True)
        logits = step(tokens, par, start, self.cache.keys, self.cache.values, window)
        if step is self._step and self.compiled and self.device.type == "cuda":
            logits = logits.clone()  # a CUDA graph's output is overwritten by its next replay
        return logits[:m]

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
    def _run(self, tokens, parents, last_only):
        n = tokens.numel()
        kwargs = {}
        if parents is None:
            positions, tree_mask = torch.arange(n, device=self.device) + self.length, None
        else:
            tree_mask = fast_llama.tree_ancestors(torch.tensor(parents, device=self.device))
            positions = tree_mask.sum(1) - 1 + self.length
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
        k = len(keep)
        if keep == list(range(k)):
            if n_pending - k:
                self.cache.crop(-(n_pending - k))
            return
        index = torch.cat([torch.arange(self.length, device=self.device),
                           torch.tensor(keep, device=self.device) + self.length])
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)


BACKENDS = ("auto", "fast", "hf")


def make_target(model, tokenizer, backend: str = "auto", attention=None,
                exit_layer: int | None = None, compile: bool = False,
                exact: bool = False) -> Target:
    """``compile``/``exact`` apply to the fast backend (see :class:`FastTarget`); the HF backend
    refuses them."""
    fast_opts = {"compile": compile, "exact": exact}
    if exit_layer:
        n_layers = model.config.num_hidden_layers
        if not fast_llama.supports(model):
            raise UserError(f"early exit (draft_model=self:N) needs a Llama-architecture model, "
                            f"not {model.config.model_type}")
        if not 1 <= exit_layer < n_layers:
            raise UserError(f"draft_model=self:{exit_layer}: choose N from 1 to {n_layers - 1}")
        return FastTarget(model, tokenizer, attention=attention, exit_layer=exit_layer, **fast_opts)
    if backend not in BACKENDS:
        raise UserError(f"model.backend={backend} is not one of {', '.join(BACKENDS)}")
    if backend == "fast" and not fast_llama.supports(model):
        raise UserError(f"model.backend=fast supports {', '.join(fast_llama.SUPPORTED)} models, not "
                        f"{model.config.model_type}; use model.backend=hf")
    if backend == "fast" or (backend == "auto" and fast_llama.supports(model)):
        return FastTarget(model, tokenizer, attention=attention, **fast_opts)
    if compile or exact:
        raise UserError("compile=true and exact=true need the lean forward (model.backend=fast, "
                        "Llama-architecture models); set them to false for this model")
    return HFTarget(model, tokenizer)
