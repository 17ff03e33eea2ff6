"""X-LoRA for Llama-architecture models inside vLLM (registered as an out-of-tree model).

Each forward runs two passes over vLLM's own Llama layers:

1. the *scaling pass*: the base model (adapters scaled by `scaling_pass_value`, 0 by
   default, i.e. no adapter at all) through a second set of attention layers, so its
   keys and values live in their own KV cache, paged by vLLM with the same block tables
   as the real pass (prefix caching therefore stays valid for both);
2. the classifier turns the scaling pass's final hidden states into per-token scalings
   (token x adapted module x expert: softmax with temperature, optional top-k, global
   weight), exactly as peft's `XLoraClassifier` / `XLoraLayer` do;
3. the *real pass*: every adapted module adds sum_e s_e * scale_e * B_e A_e x, computed
   with the experts stacked, two GEMMs per module: (x A_cat^T * s) B_cat^T; modules
   that share an input and a fused projection (q/k/v, gate/up) share the two GEMMs.

Non-granular mode (mistral.rs's `tgt_non_granular_index`): scalings come from the
prompt; every generated token reuses the scalings of the token before it, read from a
per-token scalings store paged like the KV cache, and a batch with only generated tokens
skips the scaling pass entirely. Whether a step is such a batch is vLLM's host-side
`max_query_len`, so that step runs without a device-to-host sync and vLLM captures it as
a full CUDA graph (its default FULL_AND_PIECEWISE mode captures decode-only steps whole);
steps with prompt tokens run their scaling pass eagerly. The real pass of this mode is a
compiled module of its own (`XLoraRealPass`): run uncompiled inside the full graph, it
decoded at 0.52x / 0.65x the base model's tok/s at batch 1 / 64 on an H200; compiled,
0.88x / 1.02x (medians of four side-by-side runs, benchmarks/results/gpu_decode).

Both passes, the classifier and the mixing run inside one `XLoraLlamaModel.forward`, and
the per-token expert weights travel as a tensor argument from the classifier to the
layers. vLLM compiles that forward (torch.compile, then CUDA graphs on a GPU) once and
then skips the guards: when the scalings were Python state on the layers and the pass a
flag on a second call of the compiled model, the graph traced for one call served both,
and on an H200 the compiled model parted from peft on every prompt (max |log-prob
difference| 11.9, against 0.18 eager).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from vllm.compilation.backends import set_model_tag
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

try:
    from vllm.model_executor.layers.attention import Attention
except ImportError:  # vLLM < 0.30
    from vllm.attention.layer import Attention

# Order in which peft numbers adapted modules inside one Llama layer (module
# registration order), which fixes the layer index of layerwise scalings.
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _xlora(config: Any) -> dict[str, Any]:
    spec = getattr(config, "xlora", None)
    if not isinstance(spec, dict):
        raise ValueError("config.json has no 'xlora' section; export the checkpoint with "
                         "ruvllm.adapters.xlora.checkpoint.export_for_vllm")
    return spec


class XLoraClassifier(nn.Module):
    """peft's XLoraClassifier (inference form: dropout is a no-op)."""

    def __init__(self, hidden: int, spec: dict[str, Any]) -> None:
        super().__init__()
        self.n_experts = spec["n_experts"]
        self.n_modules = spec["n_modules"]
        self.layerwise = spec["layerwise_scalings"]
        out = self.n_experts * (self.n_modules if self.layerwise else 1)
        depth, size = spec["classifier"]["depth"], spec["classifier"]["size"]
        layers: list[nn.Module] = []
        if depth == 1:
            layers.append(nn.Linear(hidden, out, bias=True))
        else:
            layers += [nn.Linear(hidden, size, bias=True), nn.ReLU()]
            for _ in range(depth - 2):
                layers += [nn.Linear(size, size, bias=True), nn.ReLU()]
            layers.append(nn.Linear(size, out, bias=True))
        self.layers = nn.Sequential(*layers)
        self.enable_softmax = spec["enable_softmax"]
        self.temperature = spec["softmax_temperature"]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] -> scalings [T, n_modules, n_experts] (or [T, 1, E] shared)."""
        logits = self.layers(hidden)
        logits = logits.view(hidden.shape[0], self.n_modules if self.layerwise else 1, self.n_experts)
        if self.enable_softmax:
            logits = torch.softmax(logits / self.temperature, dim=-1)
        return logits


class XLoraMixer:
    """Turns classifier scalings into per-module expert weights (peft's
    `get_maybe_topk_scalings`, then the per-expert LoRA scale and the global weight).
    Stateless: its results are tensors handed to the layers, never kept between calls."""

    def __init__(self, spec: dict[str, Any], expert_scales: torch.Tensor) -> None:
        self.top_k = spec.get("top_k_lora")
        self.softmax_topk = spec.get("enable_softmax_topk", False)
        self.global_weight = spec["global_scaling_weight"]
        self.layerwise = spec["layerwise_scalings"]
        self.rank = spec["rank"]
        self.expert_scales = expert_scales  # [E]: lora_alpha / r of each expert

    def expand(self, scalings: torch.Tensor | None) -> torch.Tensor | None:
        """[T, modules, E*r] (shared weights: [T, 3*E*r]): every module's expert weights at once, each repeated over its
        expert's rank (a handful of tensor ops per forward instead of a handful per module,
        210 modules on SmolLM2, which on a CPU decode step cost more than the expert GEMMs).
        None: no adapter this pass."""
        if scalings is None:
            return None
        w = self.weights(scalings).repeat_interleave(self.rank, dim=-1)
        if not self.layerwise:
            # One set of weights for every module: laid out once for the widest group, so
            # each group takes a slice instead of a copy per module and pass.
            return w[:, 0, :].repeat(1, max(len(m) for m in EXPERT_GROUPS.values()))
        return w

    def group(self, expanded: torch.Tensor | None, first: int, count: int) -> torch.Tensor | None:
        """[T, count*E*r]: the weights of `count` consecutive modules from `first`, laid
        out like the stacked A output of those modules."""
        if expanded is None:
            return None
        if not self.layerwise:  # `expand` laid the shared weights out side by side
            width = expanded.shape[1] // max(len(m) for m in EXPERT_GROUPS.values())
            return expanded[:, :count * width]
        return expanded[:, first:first + count, :].reshape(expanded.shape[0], -1)

    def weights(self, scalings: torch.Tensor, module_index: int | None = None) -> torch.Tensor:
        """[T, E] weights of one module, or [T, modules, E] of all when module_index is None."""
        s = scalings if module_index is None else scalings[:, module_index if self.layerwise else 0, :]
        if self.top_k is not None:
            _, top = torch.topk(s, k=self.top_k, dim=-1)
            mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, True)
            s = s * mask.to(s.dtype)
        if self.softmax_topk:
            nonzero = s != 0
            s = torch.softmax(s.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
        return s * self.expert_scales * self.global_weight


# Adapted modules that read the same input and write one fused projection's output.
EXPERT_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
                 "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}


class ExpertGroup(nn.Module):
    """The LoRA experts of one fused projection (q/k/v -> qkv_proj, gate/up ->
    gate_up_proj, or a single o/down projection): the adapted members' A matrices stacked
    and their B matrices placed block-diagonally, so the whole group costs two GEMMs.
    The checkpoint's per-module tensors load straight into their slices; no other copy
    of the experts is kept."""

    def __init__(self, members: tuple[str, ...], adapted: tuple[str, ...],
                 dims: dict[str, tuple[int, int]], rank_total: int, first_module: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.first_module = first_module  # mixer index of the first adapted member
        self.count = len(adapted)
        fused_out = sum(dims[t][0] for t in members)
        in_dim = dims[adapted[0]][1]
        # Buffers, not parameters: vLLM's loader checks parameters against the base
        # checkpoint's names; load_weights below checks the experts itself.
        self.register_buffer("a", torch.zeros(self.count * rank_total, in_dim, dtype=dtype),
                             persistent=False)
        self.register_buffer("b", torch.zeros(fused_out, self.count * rank_total, dtype=dtype),
                             persistent=False)
        self.slots: dict[str, tuple[slice, slice]] = {}  # member -> (A rows/B columns, B rows)
        offset, column = 0, 0
        for t in members:
            width = dims[t][0]
            if t in adapted:
                self.slots[t] = (slice(column, column + rank_total), slice(offset, offset + width))
                column += rank_total
            offset += width

    def load(self, member: str, which: str, tensor: torch.Tensor) -> None:
        ranks, rows = self.slots[member]
        target = self.a[ranks] if which == "A" else self.b[rows, ranks]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"X-LoRA expert {member}.{which}: shape {tuple(tensor.shape)}, "
                             f"expected {tuple(target.shape)}")
        target.copy_(tensor.to(target.dtype))


class XLoraDecoderLayer(LlamaDecoderLayer):
    """A Llama layer with stacked LoRA experts and a second attention (own KV cache) for
    the scaling pass."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", **kwargs: Any) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        config = vllm_config.model_config.hf_config
        spec = _xlora(config)
        sa = self.self_attn
        self.scaling_attn = Attention(
            sa.num_heads, sa.head_dim, sa.scaling, num_kv_heads=sa.num_kv_heads,
            cache_config=vllm_config.cache_config, quant_config=None,
            prefix=f"{prefix}.self_attn.scaling_attn")
        self.layer_index = int(prefix.rsplit(".", 1)[-1])
        self.targets = tuple(t for t in MODULE_ORDER if t in spec["targets"])
        rank_total = spec["n_experts"] * spec["rank"]
        dims = _module_dims(config, sa)
        first_module = self.layer_index * len(self.targets)
        self.expert_groups = nn.ModuleDict()
        for name, members in EXPERT_GROUPS.items():
            adapted = tuple(t for t in members if t in self.targets)
            if adapted:
                self.expert_groups[name] = ExpertGroup(
                    members, adapted, dims, rank_total,
                    first_module + self.targets.index(adapted[0]),
                    vllm_config.model_config.dtype)
        self.group_of = {t: name for name, members in EXPERT_GROUPS.items() for t in members}
        self.mixer: XLoraMixer | None = None  # set by the model

    def _add_delta(self, group: str, x: torch.Tensor, out: torch.Tensor,
                   weights: torch.Tensor | None) -> None:
        """out += the group's mixed expert deltas for input x (in place)."""
        if group not in self.expert_groups or weights is None:
            return
        g = self.expert_groups[group]
        out.addmm_((x @ g.a.t()) * self.mixer.group(weights, g.first_module, g.count), g.b.t())

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None, xlora_weights: torch.Tensor | None = None,
                xlora_scaling_pass: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`xlora_weights`: XLoraMixer.expand's [T, modules, E*r], None for no adapter."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)

        sa = self.self_attn
        qkv, _ = sa.qkv_proj(hidden_states)
        self._add_delta("qkv", hidden_states, qkv, xlora_weights)
        q, k, v = qkv.split([sa.q_size, sa.kv_size, sa.kv_size], dim=-1)
        q, k = sa.rotary_emb(positions, q, k)
        attn = self.scaling_attn if xlora_scaling_pass else sa.attn
        attn_out = attn(q, k, v)
        hidden_states, _ = sa.o_proj(attn_out)
        self._add_delta("o", attn_out, hidden_states, xlora_weights)

        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        mlp = self.mlp
        gate_up, _ = mlp.gate_up_proj(hidden_states)
        self._add_delta("gate_up", hidden_states, gate_up, xlora_weights)
        act = mlp.act_fn(gate_up)
        hidden_states, _ = mlp.down_proj(act)
        self._add_delta("down", act, hidden_states, xlora_weights)
        return hidden_states, residual


def _module_dims(config: Any, sa: Any) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each Llama projection (tensor parallel size 1)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    return {"q_proj": (sa.q_size, hidden), "k_proj": (sa.kv_size, hidden),
            "v_proj": (sa.kv_size, hidden), "o_proj": (hidden, sa.q_size),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
            "down_proj": (hidden, inter)}


class XLoraLlamaModel(LlamaModel):
    """Llama's decoder stack whose forward is the whole X-LoRA step: the scaling pass, the
    classifier, the mixing and the real pass, with the expert weights handed to the layers
    as a tensor. vLLM compiles this forward (it inherits LlamaModel's
    `support_torch_compile`, which traces `forward` of the instance's class), so one
    traced graph holds both passes."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "",
                 layer_type: type[nn.Module] = LlamaDecoderLayer) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        config = vllm_config.model_config.hf_config
        dtype = vllm_config.model_config.dtype
        self.xlora_spec = spec = _xlora(config)
        self.xlora_classifier = XLoraClassifier(config.hidden_size, spec).to(dtype)
        self.register_buffer("xlora_expert_scales", torch.ones(spec["n_experts"], dtype=dtype),
                             persistent=False)
        self.scaling_pass_value = float(spec.get("scaling_pass_value", 0.0))
        self.mixer = XLoraMixer(spec, self.xlora_expert_scales)
        for layer in self.layers:
            layer.mixer = self.mixer

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: Any = None, inputs_embeds: torch.Tensor | None = None,
                **_: Any) -> torch.Tensor:
        scalings = self.xlora_scalings(input_ids, positions, inputs_embeds)
        return self.run_pass(input_ids, positions, inputs_embeds, self.mixer.expand(scalings))

    def xlora_scalings(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                       inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """The classifier's scalings for every token of the batch: [T, modules, E]."""
        dummy = None
        if self.scaling_pass_value != 0.0:
            n = positions.shape[0]
            modules = self.xlora_spec["n_modules"] if self.xlora_spec["layerwise_scalings"] else 1
            dummy = self.mixer.expand(torch.full(
                (n, modules, self.xlora_spec["n_experts"]), self.scaling_pass_value,
                dtype=self.xlora_expert_scales.dtype, device=positions.device))
        hidden = self.run_pass(input_ids, positions, inputs_embeds, dummy, scaling_pass=True)
        return self.xlora_classifier(hidden)

    def run_pass(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                 inputs_embeds: torch.Tensor | None, weights: torch.Tensor | None,
                 scaling_pass: bool = False) -> torch.Tensor:
        """One pass over every layer (one pipeline stage: X-LoRA runs unsharded) and the
        final norm."""
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, xlora_weights=weights,
                                     xlora_scaling_pass=scaling_pass)
        hidden, _ = self.norm(hidden, residual)
        return hidden


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "inputs_embeds": 0,
                                         "xlora_weights": 0})
class XLoraRealPass(nn.Module):
    """The real pass alone (`XLoraLlamaModel.run_pass` with given expert weights) as a
    module vLLM compiles on its own, for non-granular mode: its decode steps take their
    scalings from the store, not from a scaling pass, so they cannot call the model's
    compiled forward (one traced graph, guards skipped: it always runs both passes). The
    model is held in a list, not as a submodule, so its weights keep their names and load
    once (vLLM's Gemma3n holds its decoder layers the same way)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "",
                 model: XLoraLlamaModel) -> None:
        super().__init__()
        self._model = [model]

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None, xlora_weights: torch.Tensor) -> torch.Tensor:
        return self._model[0].run_pass(input_ids, positions, inputs_embeds, xlora_weights)


class XLoraLlamaForCausalLM(LlamaForCausalLM):
    """vLLM model for a checkpoint exported by `ruvllm.adapters.xlora.checkpoint`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=XLoraDecoderLayer)
        self.xlora_spec = self.model.xlora_spec
        self.non_granular = bool(self.xlora_spec.get("non_granular", False))
        self._cache_config = vllm_config.cache_config
        self._block_size = vllm_config.cache_config.block_size
        self._max_batched_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        if self.non_granular:
            # Its own tag: vLLM keys a compiled module's cache directory by it.
            with set_model_tag("xlora_real_pass"):
                self.real_pass = XLoraRealPass(vllm_config=vllm_config,
                                               prefix=f"{prefix}real_pass", model=self.model)

    def _init_model(self, vllm_config: VllmConfig, prefix: str = "",
                    layer_type: type[nn.Module] = XLoraDecoderLayer) -> XLoraLlamaModel:
        return XLoraLlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: Any = None, inputs_embeds: torch.Tensor | None = None,
                **_: Any) -> torch.Tensor:
        if not self.non_granular:
            return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        scalings = self._non_granular_scalings(input_ids, positions, inputs_embeds)
        return self.real_pass(input_ids, positions, inputs_embeds,
                              self._static_weights(self.model.mixer.expand(scalings)))

    def xlora_scalings(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                       inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        return self.model.xlora_scalings(input_ids, positions, inputs_embeds)

    # -- non-granular mode ---------------------------------------------------------------

    def _batch_layout(self) -> Any:
        """The attention metadata of this step (None while vLLM profiles memory)."""
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            return None
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, list):
            metadata = metadata[0] if metadata else None
        if isinstance(metadata, dict):
            metadata = metadata.get(self.model.layers[0].self_attn.attn.layer_name)
        return metadata

    def _non_granular_scalings(self, input_ids, positions, inputs_embeds) -> torch.Tensor:
        meta = self._batch_layout()
        if meta is None or getattr(meta, "block_table", None) is None:
            return self.xlora_scalings(input_ids, positions, inputs_embeds)  # memory profiling
        store = self._scalings_store()
        if meta.max_query_len == 1:
            scalings = self._carried_scalings(meta, positions, store)
        else:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "non-granular X-LoRA captures CUDA graphs of decode-only steps only: "
                    "run it with cudagraph_mode FULL_AND_PIECEWISE (vLLM's default) or "
                    "FULL_DECODE_ONLY, or eager")
            scalings = self._mixed_step_scalings(meta, input_ids, positions, inputs_embeds, store)
        slots = self._padded(meta.slot_mapping, positions.shape[0]).to(torch.long)
        # Padding tokens (slot -1) write to the store's last row, which no token reads.
        slots = torch.where(slots >= 0, slots.clamp(max=store.shape[0] - 2), store.shape[0] - 1)
        store[slots] = scalings
        return scalings

    def _carried_scalings(self, meta: Any, positions: torch.Tensor,
                          store: torch.Tensor) -> torch.Tensor:
        """A decode-only step (one token per request; vLLM's `max_query_len`, a host-side
        int): every token takes the scalings of the token before it, with no scaling pass
        and no device-to-host sync, so vLLM captures this step as a full CUDA graph. Token
        i belongs to request i. A one-token prompt has no token before it; scheduled in
        such a step it gets the classifier's prior (its output for a zero hidden state)."""
        table = meta.block_table
        rows = torch.arange(positions.shape[0], device=positions.device)
        scalings = store[self._prev_slots(table, rows.clamp(max=table.shape[0] - 1), positions,
                                          store)]
        prior = self.model.xlora_classifier(store.new_zeros(1, self.config.hidden_size))
        return torch.where((positions == 0)[:, None, None], prior, scalings)

    def _mixed_step_scalings(self, meta: Any, input_ids, positions: torch.Tensor,
                             inputs_embeds, store: torch.Tensor) -> torch.Tensor:
        """A step with prompt tokens: the scaling pass for the batch, and a decode token
        (one token on top of earlier ones) takes the scalings of the token before it, so
        they stay those of the prompt's end. Runs eagerly (it syncs on the batch layout)."""
        n = positions.shape[0]
        qsl = meta.query_start_loc
        num_reqs = qsl.shape[0] - 1
        query_lens = (qsl[1:] - qsl[:-1]).to(torch.long)
        context_lens = meta.seq_lens[:num_reqs].to(torch.long) - query_lens
        decode_req = (query_lens == 1) & (context_lens > 0)
        owner = torch.repeat_interleave(torch.arange(num_reqs, device=positions.device), query_lens)
        if owner.shape[0] < n:  # padding tokens at the end of the batch
            owner = torch.cat([owner, owner.new_zeros(n - owner.shape[0])])
        decode_tok = decode_req[owner] & (torch.arange(n, device=positions.device) < qsl[-1])
        scalings = self.xlora_scalings(input_ids, positions, inputs_embeds)
        if bool(decode_tok.any()):
            carried = store[self._prev_slots(meta.block_table, owner, positions, store)]
            scalings = torch.where(decode_tok[:, None, None], carried, scalings)
        return scalings

    def _prev_slots(self, table: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                    store: torch.Tensor) -> torch.Tensor:
        """The store row of the token before each token (its request's block-table row
        `rows`); clamped so that no index leaves the table or reaches the padding row."""
        prev = (positions.to(torch.long) - 1).clamp(min=0)
        blocks = table[rows, (prev // self._block_size).clamp(max=table.shape[1] - 1)]
        slots = blocks.to(torch.long) * self._block_size + prev % self._block_size
        return slots.clamp(max=store.shape[0] - 2)

    @staticmethod
    def _padded(slot_mapping: torch.Tensor, n: int) -> torch.Tensor:
        if slot_mapping.shape[0] >= n:
            return slot_mapping[:n]
        return torch.nn.functional.pad(slot_mapping, (0, n - slot_mapping.shape[0]), value=-1)

    def _static_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """`weights` copied into the head of one buffer kept for the engine's life. vLLM's
        piecewise CUDA graphs (steps with prompt tokens) replay reading their inputs where
        they lay at capture, as the runner's own input_ids and positions do; weights
        computed outside the compiled pass lie elsewhere every step, and on an H200 the
        model answered nonsense from them (max |log-prob difference| 24 against peft)."""
        n = weights.shape[0]
        buffer = getattr(self, "_weights_buffer", None)
        if buffer is None or buffer.shape[0] < n:
            buffer = weights.new_empty((max(n, self._max_batched_tokens), *weights.shape[1:]))
            self._weights_buffer = buffer
        buffer[:n].copy_(weights)
        return buffer[:n]

    def _scalings_store(self) -> torch.Tensor:
        """Per-KV-slot scalings ([slots + 1, modules, E]; the last row takes padding).
        Sized from the KV cache; vLLM first captures throwaway graphs over a minimal cache
        whose size it has not published yet, for which a one-block store (indices clamped)
        serves. Allocated with `empty`: inside a graph capture an allocation launches no
        kernel, where `zeros` would be captured and wipe the store on every replay; every
        slot a token reads was written by the step that computed it."""
        cache = self._cache_config
        rows = max(cache.num_gpu_blocks or 1, 1) * cache.block_size + 1
        store = getattr(self, "_store", None)
        if store is None or store.shape[0] != rows:
            modules = self.xlora_spec["n_modules"] if self.xlora_spec["layerwise_scalings"] else 1
            store = torch.empty(rows, modules, self.xlora_spec["n_experts"],
                                dtype=self.model.xlora_expert_scales.dtype,
                                device=self.model.xlora_expert_scales.device)
            self._store = store
        return store

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        own: dict[str, torch.Tensor] = {}

        def base_weights():
            for name, tensor in weights:
                if name.startswith("xlora."):
                    own[name] = tensor
                else:
                    yield name, tensor

        loaded = set(super().load_weights(base_weights()))
        experts_loaded = set()
        for name, tensor in own.items():
            parts = name.split(".")
            if parts[1] == "layers":  # xlora.layers.{i}.{target}.{A|B}
                layer = self.model.layers[int(parts[2])]
                layer.expert_groups[layer.group_of[parts[3]]].load(parts[3], parts[4], tensor)
                experts_loaded.add(name)
            elif parts[1] == "classifier":  # xlora.classifier.{k}.{weight|bias}
                module = self.model.xlora_classifier.layers[int(parts[2])]
                getattr(module, parts[3]).data.copy_(tensor.to(module.weight.dtype))
                loaded.add(f"model.xlora_classifier.layers.{parts[2]}.{parts[3]}")
            elif parts[1] == "expert_scales":
                scales = self.model.xlora_expert_scales
                scales.copy_(tensor.to(scales.dtype))
        expected = {f"xlora.layers.{i}.{t}.{ab}" for i, layer in enumerate(self.model.layers)
                    for t in layer.targets for ab in "AB"}
        if expected - experts_loaded:
            missing = sorted(expected - experts_loaded)
            raise ValueError(f"X-LoRA checkpoint lacks {len(missing)} expert tensors, "
                             f"e.g. {missing[:3]}")
        return loaded
