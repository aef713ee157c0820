"""protect="apart": registers merge only with registers, patches only with patches, class tokens never.

Each rule is checked against a brute-force loop, an unpatched timm model, or an invariant read off
the tracked sources: at every r up to the cap, no output token holds both a register and a patch.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TIE, make_vit, matching_margin
from test_families import build, images_for

import regtome
from regtome.layout import CLASS, PATCH, REGISTER
from regtome.merge import bipartite_soft_matching, capped_r

WITH_REGISTERS = ["dinov3", "rope_reg_gap", "reg4_map", "diff_attention", "diff_parallel"]


def brute_force_kind_matching(metric, kind, r, num_protected, num_registers):
    """One apart step as loops: per image, each A token's best same-kind B token, the r best merge.

    Returns, per image, {a: (similarity, {b within TIE of a's best})} for the A tokens that must merge and
    for those that may (their similarity within TIE of the r-th best: rounding decides), as two dicts."""
    out = []
    for m, k in zip(metric, kind):
        mergeable = list(range(num_protected, m.shape[0]))
        set_a, set_b = mergeable[0::2], mergeable[1::2]
        r_eff = capped_r(r, m.shape[0], num_protected, num_registers)
        best = {}
        for a in set_a:
            same = [b for b in set_b if k[b] == k[a]]
            if same:
                sims = {b: F.cosine_similarity(m[a], m[b], dim=0).item() for b in same}
                top = max(sims.values())
                best[a] = (top, {b for b, sim in sims.items() if sim >= top - TIE})
        order = sorted(best, key=lambda a: -best[a][0])
        assert len(order) >= r_eff, "the cap promised enough same-kind pairs"
        if r_eff == 0:
            out.append(({}, {}))
            continue
        cut = best[order[r_eff - 1]][0]
        upper = best[order[r_eff]][0] if r_eff < len(order) else -2.0
        must = {a: best[a] for a in order[:r_eff] if best[a][0] > upper + TIE}
        may = {a: best[a] for a in order if best[a][0] >= cut - TIE}
        out.append((must, may))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_matching_agrees_with_a_brute_force_loop(seed):
    generator = torch.Generator().manual_seed(seed)
    batch, num_protected, num_registers, num_patches = 3, 1, 4, 20
    num_tokens = num_protected + num_registers + num_patches
    metric = torch.randn(batch, num_tokens, 8, generator=generator)
    kind = torch.full((batch, num_tokens), PATCH)
    kind[:, 0] = CLASS
    for b in range(batch):  # registers scattered differently in each image, as after earlier merges
        slots = torch.randperm(num_tokens - 1, generator=generator)[: num_registers - b] + 1
        kind[b, slots] = REGISTER
    cap = capped_r(10**6, num_tokens, num_protected, num_registers)
    for r in range(cap + 1):
        merge, _ = bipartite_soft_matching(metric, r, num_protected, kind=kind, num_registers=num_registers)
        expected = brute_force_kind_matching(metric, kind, r, num_protected, num_registers)
        identity = torch.eye(num_tokens)[None].expand(batch, -1, -1)
        held = merge(identity, mode="sum")  # (B, T - r, T): the input tokens each output token holds
        for b in range(batch):
            groups = [row.nonzero().flatten().tolist() for row in held[b]]
            merged_groups = [g for g in groups if len(g) > 1]
            must, may = expected[b]
            assert sum(len(g) - 1 for g in merged_groups) == r
            merged_a = {a for g in merged_groups for a in g if a in may or a in must}
            assert set(must) <= merged_a and len(merged_a) == r, "the r best A tokens merged"
            for a in merged_a:  # each into its best same-kind B token (or one tied with it)
                assert any(a in g and set(g) & may[a][1] for g in merged_groups)
            for group in groups:
                assert len({int(kind[b, t]) for t in group}) == 1, "a merge mixed kinds"


def test_the_cap_rule_leaves_enough_same_kind_pairs_in_the_worst_arrangement():
    """Registers all in set B and patches filling A: the cap must still only allow patch-patch merges."""
    for num_registers in range(0, 6):
        for mergeable in range(2, 30):
            cap = capped_r(10**6, mergeable, 0, num_registers)
            # worst case for A: as many registers as possible in A (they may have no register partner)
            for registers_in_a in range(0, num_registers + 1):
                num_a, num_b = (mergeable + 1) // 2, mergeable // 2
                registers_in_b = num_registers - registers_in_a
                if registers_in_a > num_a or registers_in_b > num_b:
                    continue
                patches_a, patches_b = num_a - registers_in_a, num_b - registers_in_b
                eligible = (patches_a if patches_b else 0) + (registers_in_a if registers_in_b else 0)
                assert cap <= eligible, (num_registers, mergeable, registers_in_a)


def _trained_vit(steps: int = 30) -> torch.nn.Module:
    """A tiny 4-register ViT trained a few steps on a learnable task, so its registers differ."""
    torch.manual_seed(0)
    model = make_vit("class_reg4").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        targets = torch.randint(0, 10, (32,), generator=generator)
        images = torch.randn(32, 3, 32, 32, generator=generator) * 0.5 + targets[:, None, None, None] / 5
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def assert_kinds_never_mix(model, images, num_class, num_register):
    """Every output token's source is only patches, only registers, or one class token."""
    record = regtome.last_forward(model)
    source = record.source
    nc, p = num_class, num_class + num_register
    holds_class = source[:, :, :nc].sum(-1)
    holds_registers = source[:, :, nc:p].sum(-1)
    holds_patches = source[:, :, p:].sum(-1)
    assert ((holds_registers > 0) & (holds_patches > 0)).sum() == 0, "a token holds a register and a patch"
    assert ((holds_class > 0) & (holds_class + holds_registers + holds_patches > 1)).sum() == 0
    for kind, held in ((PATCH, holds_patches), (REGISTER, holds_registers), (CLASS, holds_class)):
        assert (held[record.kind == kind] > 0).all(), "a token's kind does not say what it holds"
    assert torch.equal(record.register_tokens[:, -1], (holds_registers > 0).sum(-1))


@pytest.mark.parametrize("weights", ["random", "trained"])
@pytest.mark.slow
def test_no_token_holds_a_register_and_a_patch_at_any_r(weights, images):
    model = make_vit("class_reg4") if weights == "random" else _trained_vit()
    regtome.patch.timm(model, protect="apart", trace_source=True)
    num_tokens = 1 + 4 + 64
    with torch.no_grad():
        for r in (1, 2, 4, 8, 16, 24, 30, 31, 32, 40, 64):
            model.r = r
            model(images)
            assert_kinds_never_mix(model, images, 1, 4)
            record = regtome.last_forward(model)
            assert record.r[0] == capped_r(r, num_tokens, 1, 4)  # up to and at the cap, never past it
        model.r = (32, -1.0)
        model(images)
        assert_kinds_never_mix(model, images, 1, 4)


@pytest.mark.parametrize("family", WITH_REGISTERS)
def test_every_family_with_registers_keeps_kinds_apart(family):
    model = build(family)
    layout = regtome.prefix_layout(model)
    images = images_for(model)
    with torch.no_grad():
        reference = model(images)
        regtome.patch.timm(model, r=0, protect="apart", trace_source=True)
        if family not in ("reg4_map",):  # map pools without the prefix: apart at r=0 is timm exactly
            torch.testing.assert_close(model(images), reference, atol=1e-5, rtol=0)
        for r in (2, 6, 12, 30):
            model.r = r
            out = model(images)
            assert torch.isfinite(out).all()
            assert_kinds_never_mix(model, images, layout.num_class, layout.num_register)


def test_identical_registers_collapse_first():
    torch.manual_seed(0)
    model = make_vit("gap_reg4", global_pool="avg")  # no class token, registers without position embedding
    with torch.no_grad():
        model.reg_token.copy_(torch.randn(1, 1, model.embed_dim).expand(1, 4, -1))
    regtome.patch.timm(model, r=[2, 1], protect="apart", trace_source=True)
    with torch.no_grad():
        record = regtome.trace(model, torch.randn(3, 3, 32, 32))
    after0, after1 = record.blocks[0], record.blocks[1]
    # block 0: both A registers merge (similarity 1 beats any pair of patches): 2 register tokens, no patch merged
    assert (record.register_tokens[:, 0] == 2).all()
    assert torch.equal(after0.size[after0.kind == PATCH], torch.ones_like(after0.size[after0.kind == PATCH]))
    # block 1 merges one token: the two remaining registers, again before any patch
    assert (record.register_tokens[:, 1] == 1).all()
    assert (after1.size[after1.kind == REGISTER] == 4).all()


@pytest.mark.slow
def test_each_image_gets_what_it_gets_alone(images):
    model = regtome.patch.timm(_trained_vit(), r=(12, -1.0), protect="apart")
    assert matching_margin(model, images) > TIE, "a near-tie: rounding may merge differently; take other images"
    with torch.no_grad():
        batched = model(images)
        counts = regtome.last_forward(model).register_tokens
        for i in range(len(images)):
            alone = model(images[i : i + 1])
            torch.testing.assert_close(alone, batched[i : i + 1], atol=1e-5, rtol=1e-5)
            assert torch.equal(regtome.last_forward(model).register_tokens[0], counts[i])


@pytest.mark.parametrize("pool", ["avg", "avgmax", "max"])
def test_average_pool_leaves_out_registers_per_image_by_size(pool, images):
    """Against a brute force on the full grid: under apart, the patch slots hold patch tokens only,
    so pooling the unmerged patch slots is the size-weighted pool of the patch tokens."""
    model = make_vit("gap_reg4", global_pool=pool)
    regtome.patch.timm(model, r=(12, -1.0), protect="apart")
    with torch.no_grad():
        features = model.forward_features(images)
        pooled = model.pool(features)
        final, _ = model.forward_intermediates(images, indices=1, norm=True)
    patches = final[:, 4:]  # no class token, 4 registers
    expected = {"avg": patches.mean(1), "max": patches.amax(1), "avgmax": 0.5 * (patches.amax(1) + patches.mean(1))}[
        pool
    ]
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    assert (regtome.last_forward(model).register_tokens[:, -1] < 4).any()  # registers did merge


def test_attention_pool_leaves_out_registers_with_proportional_attention(images):
    model = timm.create_model(
        "vit_so150m_patch16_reg4_map_256", embed_dim=64, num_heads=4, depth=3, img_size=64, num_classes=10
    ).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    regtome.patch.timm(model, r=(10, -1.0), protect="apart")
    with torch.no_grad():
        pooled = model.pool(model.forward_features(images))
        final, _ = model.forward_intermediates(images, indices=1, norm=True)
        p = regtome.prefix_layout(model).num_prefix
        expected = model.attn_pool(final[:, p:])  # duplicated keys on the grid = log(size) on merged keys
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


def test_dense_features_keep_registers_off_the_patch_grid(images):
    model = regtome.patch.timm(make_vit("class_reg4"), r=16, protect="apart", trace_source=True)
    with torch.no_grad():
        final, (grid,) = model.forward_intermediates(images, indices=[3], output_fmt="NLC")
    record = regtome.last_forward(model)
    held_by = record.source.argmax(dim=1)  # (B, N): which output token holds each slot
    kinds = record.kind.gather(1, held_by)
    assert (kinds[:, 5:] == PATCH).all() and (kinds[:, 1:5] == REGISTER).all()
    assert grid.shape == (3, 64, 64)


def test_merged_registers_keep_the_identity_rotation_on_dinov3():
    model = build("dinov3")
    regtome.patch.timm(model, r=20, protect="apart")
    images = images_for(model)
    captured = {}

    def spy(block, tokens, *args):
        captured.setdefault("positions", []).append((tokens.kind.clone(), tokens.position.clone()))
        return original(block, tokens, *args)

    original = type(model).regtome_block_forward  # the patched-model hook every block runs through
    type(model).regtome_block_forward = staticmethod(spy)
    try:
        with torch.no_grad():
            model(images)
    finally:
        type(model).regtome_block_forward = staticmethod(original)
    for kind, position in captured["positions"]:
        assert (position[kind != PATCH] == 0).all()  # class and (merged) registers: the identity row
        assert (position[kind == PATCH] > 0).all()
    assert (regtome.last_forward(model).register_tokens[:, -1] < 4).any()  # some registers merged


@pytest.mark.slow
def test_flops_and_token_counts_follow_the_apart_cap(images):
    model = regtome.patch.timm(make_vit("class_reg4"), protect="apart")
    for r in (4, 16, 30, (32, -1.0), [40, 20, 10, 5]):
        model.r = r
        with torch.no_grad():
            model(images)
        attn_tokens, mlp_tokens = regtome.flops.simulate_tokens(model, r, (3, 32, 32))
        assert mlp_tokens == list(regtome.last_forward(model).tokens)
    model.r = 40  # the apart cap (ceil(m/2) - 4) is below the prefix cap: fewer tokens merge
    with torch.no_grad():
        model(images)
    assert regtome.last_forward(model).r[0] == (68 + 1) // 2 - 4 == 30
    fraction = 0.6
    r = regtome.r_for_flops(model, fraction)
    assert regtome.schedule_gflops(model, r, (3, 32, 32)) <= fraction * regtome.schedule_gflops(model, 0, (3, 32, 32))


@pytest.mark.slow
def test_apart_compiles_to_one_graph(images):
    model = regtome.patch.timm(make_vit("class_reg4"), r=(8, -1.0), protect="apart")
    explanation = torch._dynamo.explain(model)(images)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_apart_is_listed_and_accepted_by_options(images):
    assert regtome.PROTECT_MODES == ("prefix", "class", "apart")
    model = regtome.patch.timm(make_vit("class_reg4"), r=8)
    with regtome.options(model, protect="apart"):
        model(images)
        assert regtome.last_forward(model).protect == "apart"
    with pytest.raises(ValueError, match="protect must be one of"):
        with regtome.options(model, protect="registers"):
            pass


@pytest.mark.slow
def test_merged_prefix_attention_against_a_brute_force_on_the_traced_tokens():
    """merged=True: each prefix slot's row is its holder's softmax row (with log(size)), spread evenly over
    the patches of each key token; at r=0 it is the unmerged map."""
    model = regtome.patch.timm(_trained_vit(), r=12, protect="apart")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with regtome.options(model, r=0):
        unmerged, names0 = regtome.prefix_attention(model, images, 2)
        same, _ = regtome.prefix_attention(model, images, 2, merged=True)
    torch.testing.assert_close(same, unmerged, atol=1e-6, rtol=1e-5)
    weights, names = regtome.prefix_attention(model, images, 3, merged=True)
    record = regtome.trace(model, images, [2])
    state = record.blocks[2]
    block = model.blocks[3]
    with torch.no_grad():
        x = block.norm1(state.x)
        qkv = block.attn.qkv(x).reshape(*x.shape[:2], 3, block.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        logits = (q * block.attn.scale) @ k.transpose(-1, -2) + state.size.log().transpose(1, 2)[:, None]
        full = logits.softmax(-1)
    for b in range(2):
        holder = state.source[b].argmax(dim=0)  # the token holding each of the 69 slots
        for slot in range(5):
            for n in range(64):
                key = holder[5 + n]
                expected = full[b, :, holder[slot], key] / state.size[b, key, 0]
                torch.testing.assert_close(weights[b, :, slot, n], expected, atol=1e-6, rtol=1e-5)
    assert names[0] == "class" and len(names) == 5
    merged_names = [n for n in names if n.startswith("registers ")]
    assert len(merged_names) == 0 or all("+" in n for n in merged_names)
