"""The pure pieces: parse_r, the cap, one merge step against a brute-force loop."""

import math

import pytest
import torch
from conftest import TIE

import regtome
from regtome.merge import bipartite_soft_matching, merge_source, merge_wavg


def test_parse_r_int_list_and_padding():
    assert regtome.parse_r(4, 3) == [3, 3, 3, 3]
    assert regtome.parse_r(4, [5, 2]) == [5, 2, 0, 0]
    assert regtome.parse_r(3, [1, 2, 3]) == [1, 2, 3]


@pytest.mark.parametrize("inflection", [-1.0, -0.5, 0.0, 0.5, 1.0])
def test_parse_r_pair_follows_tome_schedule(inflection):
    schedule = regtome.parse_r(12, (16, inflection))
    first, last = schedule[0], schedule[-1]
    assert first == int(16 * (1 - inflection))
    assert abs(last - (32 - first)) <= 1  # int() truncation at the far end
    assert all(a >= b for a, b in zip(schedule, schedule[1:])) or all(a <= b for a, b in zip(schedule, schedule[1:]))
    assert abs(sum(schedule) - 16 * 12) <= 12  # same total as a flat schedule, up to truncation


def test_parse_r_pairs_are_tuples_and_lists_are_per_block():
    assert regtome.parse_r(12, (16, -1.0))[0] == 32 and regtome.parse_r(12, (16, -1.0))[-1] == 0
    assert regtome.parse_r(12, [16, 0]) == [16, 0] + [0] * 10  # a list in Python: one int per block
    with pytest.raises(ValueError, match=r"pass a tuple: \(16, -1.0\)"):
        regtome.parse_r(12, [16, -1.0])


def test_r_from_config_has_one_rule_and_refuses_ambiguity():
    # Config files have no tuples: a two-item list with a float second item is the pair.
    assert regtome.r_from_config([16, -1.0]) == (16, -1.0)
    assert regtome.r_from_config([16, 0.5]) == (16, 0.5)
    assert regtome.r_from_config(8) == 8
    assert regtome.r_from_config([8, 4, 2]) == [8, 4, 2]
    assert regtome.r_from_config([8, 4]) == [8, 4]  # 4 cannot be an inflection: per block
    for ambiguous, pair in (([16, 0], r"\[16,0.0\]"), ([16, 1], r"\[16,1.0\]")):
        with pytest.raises(ValueError, match=f"ambiguous: write {pair} for ToMe's"):
            regtome.r_from_config(ambiguous)
    with pytest.raises(ValueError, match=r"not a schedule.*write \[16,-1.0\]"):
        regtome.r_from_config([16, -1])  # a per-block list cannot hold -1: only the pair is meant
    for bad, message in (
        (-1, "r must be >= 0"),
        ([4, -2, 8], "ints >= 0"),
        ([16, -2.0], "inflection"),
        ("16", "must be an int"),
        ([16.0, 1.0], "ints >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            regtome.r_from_config(bad)


@pytest.mark.parametrize("bad", [[16, -1], [16, 0], [16, 1], -1, [4, -2, 8], [16, -2.0]])
def test_every_r_hint_works_when_fed_back(bad):
    """A hint that proposes a spelling proposes one that r_from_config (and parse_r) accepts."""
    import re

    import yaml

    with pytest.raises(ValueError) as caught:
        regtome.r_from_config(bad)
    proposals = re.findall(r"\[[-0-9.,]+\]", str(caught.value).split(" is ", 1)[-1])
    assert proposals or "r must be" in str(caught.value), str(caught.value)
    for proposal in proposals:
        r = regtome.r_from_config(yaml.safe_load(proposal))
        regtome.parse_r(12, r)


@pytest.mark.parametrize(
    "bad", [-1, 1.5, "16", None, True, [1, -2], [1, 2.5], (16, 2.0), (16, -1.0, 3), [1] * 13, {"r": 1}]
)
def test_parse_r_rejects_malformed(bad):
    with pytest.raises(ValueError):
        regtome.parse_r(12, bad)


def test_cap_is_half_of_mergeable():
    assert regtome.capped_r(100, num_tokens=69, num_protected=5) == 32
    assert regtome.capped_r(3, num_tokens=69, num_protected=5) == 3
    assert regtome.capped_r(5, num_tokens=5, num_protected=5) == 0


def brute_force_merge(metric, x, size, r, num_protected):
    """One ToMe step written as plain loops over tokens, one sample at a time. Every decision it takes (each A
    token's best B token, which A tokens are among the r best) is checked to be no near-tie: the comparison
    with the batched matching then holds whatever the rounding of the machine."""
    outputs, sizes = [], []
    for m, xs, ss in zip(metric, x, size):
        t = m.shape[0]
        mergeable = list(range(num_protected, t))
        set_a, set_b = mergeable[0::2], mergeable[1::2]
        r_eff = min(r, len(mergeable) // 2)
        best = {}
        for a in set_a:
            sims = [torch.nn.functional.cosine_similarity(m[a], m[b], dim=0).item() for b in set_b]
            j = max(range(len(set_b)), key=lambda k: sims[k])
            best[a] = (sims[j], set_b[j])
            assert all(sims[j] - s > TIE for k, s in enumerate(sims) if k != j), "a near-tie: choose other data"
        order = sorted(set_a, key=lambda a: -best[a][0])
        merged, kept = order[:r_eff], order[r_eff:]
        if merged and kept:
            assert best[merged[-1]][0] - best[kept[0]][0] > TIE, "a near-tie at the r-th edge: choose other data"
        total = {b: xs[b] * ss[b] for b in set_b}
        mass = {b: ss[b].clone() for b in set_b}
        for a in merged:
            b = best[a][1]
            total[b] = total[b] + xs[a] * ss[a]
            mass[b] = mass[b] + ss[a]
        rows = [xs[i] for i in range(num_protected)] + [xs[a] for a in kept] + [total[b] / mass[b] for b in set_b]
        row_sizes = [ss[i] for i in range(num_protected)] + [ss[a] for a in kept] + [mass[b] for b in set_b]
        outputs.append(torch.stack(rows))
        sizes.append(torch.stack(row_sizes))
    return torch.stack(outputs), torch.stack(sizes)


@pytest.mark.parametrize("num_tokens,num_protected,r", [(21, 5, 4), (20, 1, 9), (16, 0, 3), (12, 2, 50)])
def test_merge_step_matches_brute_force(num_tokens, num_protected, r):
    g = torch.Generator().manual_seed(num_tokens + r)
    metric = torch.randn(3, num_tokens, 8, generator=g)
    x = torch.randn(3, num_tokens, 6, generator=g)
    size = torch.randint(1, 4, (3, num_tokens, 1), generator=g).float()
    size[:, :num_protected] = 1
    merge, _ = bipartite_soft_matching(metric, r, num_protected)
    out, out_size = merge_wavg(merge, x, size)
    ref, ref_size = brute_force_merge(metric, x, size, r, num_protected)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out_size, ref_size)
    assert out.shape[1] == num_tokens - min(r, (num_tokens - num_protected) // 2)
    torch.testing.assert_close(out[:, :num_protected], x[:, :num_protected])  # protected untouched
    assert torch.allclose(out_size.sum(dim=1), size.sum(dim=1))  # mass is conserved


def test_source_stays_a_partition_and_unmerge_inverts_merge():
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 17, 8, generator=g)
    merge, unmerge = bipartite_soft_matching(metric, 6, num_protected=3)
    source = merge_source(merge, torch.eye(17)[None].expand(2, -1, -1))
    assert torch.equal(source.sum(dim=1), torch.ones(2, 17))  # every input token in exactly one output
    torch.testing.assert_close(source[:, :3], torch.eye(17)[:3].expand(2, -1, -1))
    # unmerge hands each input token its group's value: the same as reading the source matrix
    merged = merge(torch.randn(2, 17, 5, generator=g))
    restored = unmerge(merged)
    torch.testing.assert_close(restored, source.transpose(1, 2) @ merged)


def test_r_zero_is_identity():
    x = torch.randn(2, 9, 4)
    merge, unmerge = bipartite_soft_matching(torch.randn(2, 9, 4), 0, 1)
    assert merge(x) is x and unmerge(x) is x
    assert math.isclose(regtome.capped_r(0, 9, 1), 0)


@pytest.mark.parametrize("mode", ["mean", "amax"])
def test_merge_modes_agree_with_the_source_matrix(mode):
    g = torch.Generator().manual_seed(3)
    metric, x = torch.randn(2, 15, 8, generator=g), torch.randn(2, 15, 4, generator=g)
    merge, _ = bipartite_soft_matching(metric, 5, num_protected=1)
    source = merge_source(merge, torch.eye(15)[None].expand(2, -1, -1))  # (2, 10, 15)
    members = source.bool()[..., None]  # which inputs each output is made of
    expanded = x[:, None].expand(-1, 10, -1, -1)  # (2, 10, 15, 4)
    if mode == "mean":
        reference = (expanded * members).sum(2) / members.sum(2)
    else:
        reference = expanded.masked_fill(~members, float("-inf")).amax(2)
    torch.testing.assert_close(merge(x, mode=mode), reference)
