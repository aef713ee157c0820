"""The matching's invariants over many random inputs (hypothesis), not only hand-picked cases: kinds never
mix under apart, every input token lands in exactly one output token (sizes sum to the slots), protected
tokens stay put and alone, r is capped, r=0 changes nothing, and unmerge gives every input token the value
of the token it went into. Ties are drawn on purpose (duplicated tokens): the invariants hold whichever
pair rounding picks. Examples are derandomized: the same ones on every machine."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regtome.layout import CLASS, PATCH, REGISTER
from regtome.merge import bipartite_soft_matching, capped_r, merge_wavg

EXAMPLES = settings(max_examples=150, deadline=None, derandomize=True, database=None)


@st.composite
def token_sets(draw):
    """metric (B, T, C), kind (B, T) with the protected tokens first, the register count, and r."""
    batch = draw(st.integers(1, 3))
    num_protected = draw(st.integers(0, 2))
    num_mergeable = draw(st.integers(0 if num_protected else 1, 24))
    num_registers = draw(st.integers(0, min(5, num_mergeable)))
    channels = draw(st.integers(1, 6))
    r = draw(st.integers(0, 40))
    duplicates = draw(st.booleans())  # exact ties between tokens
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    num_tokens = num_protected + num_mergeable
    metric = torch.randn(batch, num_tokens, channels, generator=generator)
    if duplicates and num_tokens > 1:
        copies = torch.randint(0, num_tokens, (num_tokens,), generator=generator)
        metric = metric[:, copies]
    kind = torch.full((batch, num_tokens), PATCH)
    kind[:, :num_protected] = CLASS
    for b in range(batch):  # registers anywhere among the mergeable tokens, fewer in some images
        count = int(torch.randint(0, num_registers + 1, (), generator=generator)) if b else num_registers
        slots = torch.randperm(num_mergeable, generator=generator)[:count] + num_protected
        kind[b, slots] = REGISTER
    return metric, kind, num_protected, num_registers, r


def matching(case, apart: bool):
    """The (merge, unmerge) of `case`, with kinds (apart) or without (prefix, class), and the r it must apply."""
    metric, kind, num_protected, num_registers, r = case
    merge, unmerge = bipartite_soft_matching(
        metric, r, num_protected, kind=kind if apart else None, num_registers=num_registers
    )
    return merge, unmerge, capped_r(r, metric.shape[1], num_protected, num_registers if apart else None)


def groups(merge, batch: int, num_tokens: int) -> torch.Tensor:
    """(B, T_out, T): which input tokens each output token holds."""
    identity = torch.eye(num_tokens)[None].expand(batch, -1, -1).contiguous()
    return merge(identity, mode="sum")


@EXAMPLES
@given(token_sets(), st.booleans())
def test_every_input_token_lands_once_and_protected_tokens_stay_alone(case, apart):
    metric, kind, num_protected, _, _ = case
    batch, num_tokens, _ = metric.shape
    merge, _, expected_r = matching(case, apart)
    held = groups(merge, batch, num_tokens)
    assert held.shape == (batch, num_tokens - expected_r, num_tokens)  # r capped, never past the cap
    assert torch.equal(held.sum(dim=1), torch.ones(batch, num_tokens))  # each input token in one output
    assert (held.sum(dim=2) >= 1).all()
    assert torch.equal(held[:, :num_protected], torch.eye(num_tokens)[:num_protected].expand(batch, -1, -1))
    sizes = merge_wavg(merge, metric, torch.ones(batch, num_tokens, 1))[1]
    assert torch.equal(sizes.sum(dim=1).squeeze(-1), torch.full((batch,), float(num_tokens)))  # sizes sum to slots
    if apart:  # kinds never mix: every output token holds tokens of one kind
        for b in range(batch):
            for row in held[b]:
                assert len(set(kind[b, row.bool()].tolist())) == 1, "a merge mixed kinds"


@EXAMPLES
@given(token_sets(), st.booleans())
def test_unmerge_gives_each_input_token_the_value_of_its_output_token(case, apart):
    metric = case[0]
    batch, num_tokens, channels = metric.shape
    merge, unmerge, _ = matching(case, apart)
    merged = merge(metric, mode="mean")
    restored = unmerge(merged)
    assert restored.shape == metric.shape
    owner = groups(merge, batch, num_tokens).argmax(dim=1)  # (B, T): the output token each input went into
    assert torch.equal(restored, merged.gather(1, owner[..., None].expand(-1, -1, channels)))


@EXAMPLES
@given(token_sets())
def test_r0_changes_nothing(case):
    metric, kind, num_protected, num_registers, _ = case
    merge, unmerge = bipartite_soft_matching(metric, 0, num_protected, kind=kind, num_registers=num_registers)
    assert merge(metric) is metric and unmerge(metric) is metric
