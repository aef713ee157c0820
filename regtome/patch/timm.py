"""Patch a timm `VisionTransformer` or `Eva` in place so that every block merges tokens (RegToMe).

Only the model's class is swapped (for a subclass that overrides `forward_features`, `pool` and
`forward_intermediates`); the blocks keep timm's classes, and `regtome.blocks` runs each family with
a merge inside. Per-forward state (sizes, sources, positions) travels through arguments, not shared lists.

Token layout timm builds: ``[class, (distillation), registers..., patches...]`` (Eva: DINOv3's
storage tokens are its registers). The first group (class + distillation, "class tokens") and the
registers are the prefix. With ``protect="prefix"`` the whole prefix is protected; with
``protect="class"`` only the class tokens are, as in ToMe.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
import torch.nn as nn
from timm.layers import Attention, AttentionPoolLatent, AttentionRope
from timm.layers.diff_attention import DiffAttention
from timm.models._features import feature_take_indices
from timm.models.eva import Eva, EvaAttention
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint

from ..attention import size_bias
from ..blocks import BLOCK_FORWARDS, Tokens, merging_block_forward
from ..rope import NO_POSITION, initial_positions, rope_table
from ..schedule import RSchedule, parse_r

SUPPORTED_MODELS = (VisionTransformer, Eva)
SELF_ATTENTIONS = (Attention, DiffAttention, EvaAttention, AttentionRope)

PROTECT_MODES = ("prefix", "class")
OPTIONS = ("r", "prop_attn", "trace_source", "protect", "class_layer", "register_layer")


@dataclass(frozen=True)
class PrefixLayout:
    """How many class tokens (class + distillation) and register tokens lead the sequence."""

    num_class: int
    num_register: int

    @property
    def num_prefix(self) -> int:
        return self.num_class + self.num_register


def prefix_layout(model: nn.Module) -> PrefixLayout:
    reg_token = getattr(model, "reg_token", None)  # VisionTransformer and Eva (DINOv3's storage tokens)
    num_register = 0 if reg_token is None else int(reg_token.shape[1])
    return PrefixLayout(num_class=model.num_prefix_tokens - num_register, num_register=num_register)


def prefix_names(model: nn.Module, block: int = 0) -> list[str]:
    """Names of the prefix tokens in the sequence at `block`, in order (class_layer/register_layer aware)."""
    layout = prefix_layout(model)
    has_class = getattr(model, "cls_token", None) is not None
    class_names = (["class"] if has_class else []) + ["distill"] * (layout.num_class - int(has_class))
    names = class_names if getattr(model, "class_layer", 0) <= block else []
    if getattr(model, "register_layer", 0) <= block:
        names += [f"register {i + 1}" for i in range(layout.num_register)]
    return names


def num_protected_tokens(layout: PrefixLayout, protect: str, class_present: bool, registers_present: bool) -> int:
    """Protected tokens at the front of the sequence, given which prefix groups have entered."""
    protected = layout.num_class if class_present else 0
    if protect == "prefix" and registers_present:
        protected += layout.num_register
    return protected


@dataclass(frozen=True)
class ForwardRecord:
    """What the last forward pass of a patched model did (read it with `regtome.last_forward`).

    size: (B, T, 1) fp32, how many patches each output token stands for (prefix tokens 1).
    source: (B, T, N) 0/1 with ``trace_source=True``: which of the N tokens of timm's full
        sequence each output token is made of; else None.
    tokens: tokens left after each block.
    r: tokens actually merged in each block (the requested r, capped).
    layout: the prefix (class/distillation and register tokens) of the model.
    num_protected: protected tokens at the front of the output (what average pooling leaves out).
    """

    size: torch.Tensor
    source: Optional[torch.Tensor]
    tokens: tuple[int, ...]
    r: tuple[int, ...]
    layout: PrefixLayout
    num_protected: int


class RegToMeVisionTransformer:
    """Mixin placed in front of a timm VisionTransformer (or Eva) class by `regtome.patch.timm`.

    `forward` hands the token sizes of its own pass to the pooling; `forward_head` and `pool`
    called on their own use the record of the last `forward_features`, checked against the input.
    """

    r: RSchedule
    prop_attn: bool
    trace_source: bool
    protect: str
    class_layer: int
    register_layer: int
    _regtome_record: Optional[ForwardRecord]

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        x, record = self._features(x, attn_mask, is_causal)
        return self._head(x, record, pre_logits=False)

    def forward_features(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        return self._features(x, attn_mask, is_causal)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self._head(x, self._record_for(x), pre_logits)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        return self._pool(x, self._record_for(x), pool_type)

    def _features(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> tuple[torch.Tensor, ForwardRecord]:
        if attn_mask is not None or is_causal:
            raise ValueError("RegToMe does not support attn_mask/is_causal; call regtome.remove_patch(model) first")
        r_per_block = _check_options(self)
        x, rope = self._embed(x)
        x, record, _ = self._merge_blocks(x, rope, r_per_block, self.trace_source)
        self._regtome_record = record
        return self.norm(x), record

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """timm's steps before the blocks: the tokens, and for RoPE models the rotary table
        (`regtome.rope.rope_table`; one per block for 'mixed' RoPE)."""
        if not isinstance(self, Eva):
            return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x)))), None
        x, rope = self._pos_embed(self.patch_embed(x))
        return self.norm_pre(x), None if rope is None else rope_table(rope)

    def _merge_blocks(
        self, x: torch.Tensor, rope: Optional[torch.Tensor], r_per_block: list[int], trace_source: bool,
        keep: frozenset = frozenset(), num_blocks: Optional[int] = None,
    ) -> tuple[torch.Tensor, ForwardRecord, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """Run the blocks with merging; prefix groups join at `class_layer` / `register_layer`.

        Returns the tokens, the record, and (tokens, source) after each block in `keep`.
        """
        layout = prefix_layout(self)
        nc, p = layout.num_class, layout.num_prefix
        batch, num_tokens = x.shape[:2]
        class_tokens, register_tokens, x = x[:, :nc], x[:, nc:p], x[:, p:]
        class_entry = self.class_layer if nc else -1
        register_entry = self.register_layer if layout.num_register else -1
        rope_per_block = getattr(self, "rope_mixed", False) and rope is not None

        # Sources index the full timm sequence, so prefix rows are one-hot on their own slot
        # even when the prefix enters late. Sizes stay fp32 under autocast.
        eye = None
        if trace_source:
            eye = torch.eye(num_tokens, device=x.device, dtype=x.dtype)[None].expand(batch, -1, -1)
        state = Tokens(
            x=x,
            size=x.new_ones(batch, x.shape[1], 1, dtype=torch.float32),
            source=eye[:, p:] if eye is not None else None,
            position=None if rope is None else initial_positions(batch, 0, num_tokens - p, x.device),
        )
        merged_any, tokens, applied, num_protected, kept = False, [], [], 0, {}

        for i, block in enumerate(self.blocks[:num_blocks]):
            if i == class_entry:
                state = _insert(state, class_tokens, eye, 0, nc, at=0)
            if i == register_entry:
                state = _insert(state, register_tokens, eye, nc, p, at=nc if 0 <= class_entry <= i else 0)
            num_protected = num_protected_tokens(
                layout, self.protect, 0 <= class_entry <= i, 0 <= register_entry <= i
            )
            tokens_before = state.x.shape[1]
            args = (block, state, r_per_block[i], num_protected, self.prop_attn and merged_any,
                    rope[i] if rope_per_block else rope)
            if self.grad_checkpointing and torch.is_grad_enabled():
                state = checkpoint(merging_block_forward, *args, use_reentrant=False)
            else:
                state = merging_block_forward(*args)
            merged_any = merged_any or state.x.shape[1] < tokens_before
            tokens.append(state.x.shape[1])
            applied.append(tokens_before - state.x.shape[1])
            if i in keep:
                kept[i] = (state.x, state.source)
        record = ForwardRecord(size=state.size, source=state.source, tokens=tuple(tokens), r=tuple(applied),
                               layout=layout, num_protected=num_protected)
        return state.x, record, kept

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]], dict[str, Any]]:
        """timm's `forward_intermediates` (same arguments, same output shapes) on the merged model.

        Features are computed with merging, then put back on timm's full sequence: every patch (and
        prefix token) takes the features of the token it was merged into, found through the tracked
        source (ToMe's unmerge). So a dense head sees timm's (B, C, H, W) grid. With r=0 in every
        block this is timm's own method.
        """
        r_per_block = _check_options(self)
        if not any(r_per_block) and self.class_layer == 0 and self.register_layer == 0:
            extra = {"output_dict": True} if output_dict else {}  # Eva's method has no output_dict
            if attn_mask is not None or is_causal:
                extra.update(attn_mask=attn_mask, is_causal=is_causal)
            return self._regtome_base.forward_intermediates(
                self, x, indices=indices, return_prefix_tokens=return_prefix_tokens, norm=norm,
                stop_early=stop_early, output_fmt=output_fmt, intermediates_only=intermediates_only, **extra)
        if attn_mask is not None or is_causal:
            raise ValueError("RegToMe does not support attn_mask/is_causal; call regtome.remove_patch(model) first")
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be NCHW or NLC, got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        x, rope = self._embed(x)
        x, record, kept = self._merge_blocks(x, rope, r_per_block, trace_source=True, keep=frozenset(take_indices),
                                             num_blocks=max_index + 1 if stop_early else None)
        self._regtome_record = record
        intermediates = [unmerge_tokens(self.norm(y) if norm else y, source) for y, source in
                         (kept[i] for i in take_indices)]
        p = self.num_prefix_tokens
        prefix_tokens = [y[:, :p] for y in intermediates] if p else None
        intermediates = [y[:, p:] for y in intermediates]
        if output_fmt == "NCHW":
            grid_h, grid_w = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        final = None if intermediates_only else unmerge_tokens(self.norm(x), record.source)
        if output_dict:
            out: dict[str, Any] = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix_tokens
            if final is not None:
                out["image_features"] = final
            return out
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        return intermediates if intermediates_only else (final, intermediates)

    def _record_for(self, x: torch.Tensor) -> ForwardRecord:
        """The last forward's record, if it describes `x` (same batch and token count)."""
        record = self._regtome_record
        if record is None or tuple(record.size.shape[:2]) != tuple(x.shape[:2]):
            raise RuntimeError(
                "forward_head/pool need the token sizes of the forward_features call that produced x; "
                "call forward_features on the same input first (or call the model itself)"
            )
        return record

    def _head(self, x: torch.Tensor, record: ForwardRecord, pre_logits: bool) -> torch.Tensor:
        """timm's `forward_head`, pooling with the sizes of `record`."""
        base_head = self._regtome_base.forward_head
        if base_head not in (VisionTransformer.forward_head, Eva.forward_head):  # DeiT's two heads
            return base_head(self, x, pre_logits)
        x = self._pool(x, record)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def _pool(self, x: torch.Tensor, record: ForwardRecord, pool_type: Optional[str] = None) -> torch.Tensor:
        """timm's pooling, with averages weighted by token size (a merged token counts as its patches).

        Attention pooling ('map') gets proportional attention: its latent query weighs each token by
        its size (log(size) on the logits), as the blocks do."""
        size = record.size
        if self.attn_pool is not None:
            if isinstance(self, VisionTransformer) and not self.pool_include_prefix:  # Eva's pool sees all
                x, size = x[:, record.num_protected:], size[:, record.num_protected:]
            return self.attn_pool(x, attn_mask=size_bias(size, x.dtype) if any(record.r) else None)
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type not in ("avg", "avgmax"):
            return self._regtome_base.pool(self, x, pool_type)  # 'token', 'max', '' do not depend on sizes
        size = size.to(x.dtype)
        if not getattr(self, "pool_include_prefix", False):  # Eva always leaves the prefix out
            x, size = x[:, record.num_protected:], size[:, record.num_protected:]
        mean = (x * size).sum(dim=1) / size.sum(dim=1)
        return mean if pool_type == "avg" else 0.5 * (x.amax(dim=1) + mean)

    # Read-only views of the last record, kept for code written against the first release.
    @property
    def regtome_size(self) -> Optional[torch.Tensor]:
        return None if self._regtome_record is None else self._regtome_record.size

    @property
    def regtome_source(self) -> Optional[torch.Tensor]:
        return None if self._regtome_record is None else self._regtome_record.source

    @property
    def regtome_tokens(self) -> list[int]:
        return [] if self._regtome_record is None else list(self._regtome_record.tokens)


def unmerge_tokens(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """(B, T, C) merged tokens -> (B, N, C) on timm's full sequence: token n takes the features of the
    output token whose source row holds n (rows are disjoint 0/1, so a matrix product picks it).
    Prefix slots whose tokens have not entered the network yet (class_layer/register_layer) are zero."""
    return torch.bmm(source.transpose(1, 2).to(x.dtype), x)


def _insert(tokens: Tokens, new_tokens: torch.Tensor, eye: Optional[torch.Tensor], first: int, stop: int,
            at: int) -> Tokens:
    """Insert prefix tokens (size 1, no position) at `at`; their sources are rows first:stop of `eye`."""
    def spliced(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return torch.cat([old[:, :at], new, old[:, at:]], dim=1)

    batch, count = new_tokens.shape[:2]
    return Tokens(
        x=spliced(tokens.x, new_tokens),
        size=spliced(tokens.size, tokens.size.new_ones(batch, count, 1)),
        source=None if tokens.source is None else spliced(tokens.source, eye[:, first:stop]),
        position=None if tokens.position is None else spliced(
            tokens.position, tokens.position.new_full((batch, count), NO_POSITION)),
    )


def _check_model(model: nn.Module) -> None:
    """Refuse, naming why, every model whose forward RegToMe could not reproduce exactly at r=0."""
    if not isinstance(model, SUPPORTED_MODELS):
        reason = {"VisionTransformerRelPos": ": its relative-position bias table is indexed by grid position, "
                  "which merged tokens no longer have"}.get(type(model).__name__, "")
        raise TypeError(f"regtome.patch.timm needs a timm VisionTransformer or Eva (or subclass), "
                        f"got {type(model).__name__}{reason}")
    for i, block in enumerate(model.blocks):
        if type(block) not in BLOCK_FORWARDS:
            raise TypeError(f"block {i} is a {type(block).__name__}; RegToMe supports "
                            f"{', '.join(sorted(c.__name__ for c in BLOCK_FORWARDS))}")
        attentions = [branch.attn for branch in block.attns] if hasattr(block, "attns") else [getattr(block, "attn", None)]
        for attn in attentions:
            if attn is not None and type(attn) not in SELF_ATTENTIONS:
                raise TypeError(f"block {i} uses {type(attn).__name__}; RegToMe supports "
                                f"{', '.join(c.__name__ for c in SELF_ATTENTIONS)}")
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is not None and type(attn_pool) is not AttentionPoolLatent:
        raise TypeError(f"global_pool={model.global_pool!r} uses {type(attn_pool).__name__}, which cannot weigh "
                        "merged tokens; RegToMe supports AttentionPoolLatent ('map'), 'token', 'avg', 'avgmax', 'max'")
    if isinstance(model, Eva) and model.patch_drop is not None:
        raise TypeError("patch dropout (patch_drop_rate > 0) on an Eva model gives each image its own rotary "
                        "table, which RegToMe does not follow; build the model with patch_drop_rate=0")


def _check_options(model: nn.Module) -> list[int]:
    """Validate the patch options (they may change between calls); return the per-block r."""
    r_per_block = parse_r(len(model.blocks), model.r)
    if model.protect not in PROTECT_MODES:
        raise ValueError(f"protect must be one of {PROTECT_MODES}, got {model.protect!r}")
    layout, depth = prefix_layout(model), len(model.blocks)
    for name, count, what in (
        ("class_layer", layout.num_class, "a class token"),
        ("register_layer", layout.num_register, "register tokens"),
    ):
        layer = getattr(model, name)
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < depth:
            raise ValueError(f"{name} must be an int in [0, {depth - 1}], got {layer!r}")
        if layer > 0 and count == 0:
            raise ValueError(f"{name}={layer} but the model has no {what}; set {name}=0")
    return r_per_block


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"RegToMe{cls.__name__}", (RegToMeVisionTransformer, cls), {"_regtome_base": cls})
    return _PATCHED_CLASSES[cls]


def timm(
    model: VisionTransformer,
    r: RSchedule = 0,
    prop_attn: bool = True,
    trace_source: bool = False,
    protect: str = "prefix",
    class_layer: int = 0,
    register_layer: int = 0,
) -> VisionTransformer:
    """Patch `model` in place for register-aware token merging and return it.

    Args:
        model: a timm `VisionTransformer` (or subclass such as DeiT's distilled model) or `Eva`
            (DINOv3, EVA-02, the RoPE ViTs); blocks of the families in `regtome.blocks`.
        r: tokens merged per block: an int, a pair ``(r, inflection)`` or a list per block.
            Change it any time through ``model.r``.
        prop_attn: proportional attention (log(size) added to the attention logits).
        trace_source: keep ``model.regtome_source`` (B, T, N) for visualisation.
        protect: ``"prefix"`` never merges class, distillation or register tokens;
            ``"class"`` protects only class and distillation tokens (ToMe's behaviour, for ablations).
        class_layer: block at which the class (and distillation) token enters the network.
        register_layer: block at which the register tokens enter the network.
    """
    _check_model(model)
    base = getattr(model, "_regtome_base", type(model))
    model.__class__ = _patched_class(base)
    options = dict(r=r, prop_attn=prop_attn, trace_source=trace_source, protect=protect,
                   class_layer=class_layer, register_layer=register_layer)
    for name, value in options.items():
        setattr(model, name, value)
    try:
        _check_options(model)
    except ValueError:
        remove_patch(model)
        raise
    model._regtome_record = None
    return model


def remove_patch(model: nn.Module) -> nn.Module:
    """Undo `regtome.patch.timm`: restore the original class and drop RegToMe's attributes."""
    base = getattr(type(model), "_regtome_base", None)
    if base is None:
        return model
    model.__class__ = base
    for name in OPTIONS + ("_regtome_record",):
        model.__dict__.pop(name, None)
    return model


def is_patched(model: nn.Module) -> bool:
    return getattr(type(model), "_regtome_base", None) is not None


def _require_patched(model: nn.Module, what: str) -> None:
    if not is_patched(model):
        raise TypeError(f"{what} needs a model patched with regtome.patch.timm, got {type(model).__name__}")


@contextmanager
def options(model: nn.Module, **changes: Any) -> Iterator[nn.Module]:
    """Apply patch options for a block of code; the previous ones come back on exit, also on error.

        with regtome.options(model, r=16, protect="class"):
            logits = model(images)

    Any of r, prop_attn, trace_source, protect, class_layer, register_layer. The new values are
    checked before the block runs (ValueError, and nothing changed, when one is invalid).
    """
    _require_patched(model, "regtome.options")
    unknown = sorted(set(changes) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown RegToMe option(s) {', '.join(unknown)}; options are {', '.join(OPTIONS)}")
    previous = {name: getattr(model, name) for name in changes}
    try:
        for name, value in changes.items():
            setattr(model, name, value)
        _check_options(model)
    except ValueError:
        for name, value in previous.items():
            setattr(model, name, value)
        raise
    try:
        yield model
    finally:
        for name, value in previous.items():
            setattr(model, name, value)


def last_forward(model: nn.Module) -> ForwardRecord:
    """The record of the patched model's last forward pass (sizes, sources, tokens and r per block)."""
    _require_patched(model, "regtome.last_forward")
    if model._regtome_record is None:
        raise RuntimeError("the model has not run since it was patched; call it on an input first")
    return model._regtome_record
