"""Dense features on the full grid (forward_intermediates) and r from a FLOP budget."""

import pytest
import torch
from conftest import NUM_PATCHES, make_vit

import regtome
from regtome.budget import simulate_tokens


@pytest.mark.parametrize("variant", ["class_reg4", "gap_reg4", "distilled", "dynamic_size"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(indices=2),
        dict(indices=[0, 3], output_fmt="NLC", norm=True),
        dict(return_prefix_tokens=True, intermediates_only=True),
        dict(output_dict=True, return_prefix_tokens=True),
    ],
)
def test_forward_intermediates_at_r0_is_timm(variant, kwargs, images):
    expected = make_vit(variant).forward_intermediates(images, **kwargs)
    got = regtome.patch.timm(make_vit(variant), r=0).forward_intermediates(images, **kwargs)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(indices=2),
        dict(indices=[0, 3], output_fmt="NLC", norm=True),
        dict(return_prefix_tokens=True, intermediates_only=True),
        dict(output_dict=True, return_prefix_tokens=True),
        dict(stop_early=True, indices=[1]),
    ],
)
def test_forward_intermediates_merged_has_timms_shapes(kwargs, images):
    def shapes(out):
        if isinstance(out, dict):
            return {k: shapes(v) for k, v in out.items()}
        if isinstance(out, (list, tuple)):
            return [shapes(v) for v in out]
        return tuple(out.shape)

    expected = make_vit("class_reg4").forward_intermediates(images, **kwargs)
    model = regtome.patch.timm(make_vit("class_reg4"), r=12)
    assert shapes(model.forward_intermediates(images, **kwargs)) == shapes(expected)


def test_unmerged_features_against_a_brute_force_reference(images):
    """Each patch carries the features of the output token whose source holds it: checked by a loop."""
    model = regtome.patch.timm(make_vit("class_reg4"), r=12, trace_source=True, protect="prefix")
    final, (last,) = model.forward_intermediates(images, indices=[3], output_fmt="NLC", norm=True)
    merged = model.forward_features(images)  # the same merged computation, in merged form
    source = regtome.last_forward(model).source
    batch, tokens, num_full = source.shape
    expected = torch.zeros(batch, num_full, merged.shape[-1])
    for b in range(batch):
        for n in range(num_full):
            owners = [t for t in range(tokens) if source[b, t, n] == 1]
            assert len(owners) == 1
            expected[b, n] = merged[b, owners[0]]
    torch.testing.assert_close(final, expected)
    torch.testing.assert_close(last, expected[:, 5:])
    # merging shows: far fewer distinct patch features than patches, and the prefix untouched
    distinct = {tuple(v.tolist()) for v in last[0].round(decimals=5)}
    assert len(distinct) == tokens - 5 < NUM_PATCHES
    assert regtome.last_forward(model).size[:, :5].eq(1).all()


def test_forward_is_unchanged_by_forward_intermediates(images):
    model = regtome.patch.timm(make_vit("gap_reg4"), r=8)
    before = model(images)
    model.forward_intermediates(images)
    torch.testing.assert_close(model(images), before, atol=0, rtol=0)


def tokens_seen_by_the_forward(model, images) -> tuple[list[int], list[int]]:
    """Tokens entering each block's attention and its MLP, read by hooks during a real forward pass."""
    attn, mlp = [], []
    hooks = [
        h
        for block in model.blocks
        for h in (
            block.norm1.register_forward_hook(lambda m, i, o: attn.append(o.shape[1])),
            block.mlp.register_forward_hook(lambda m, i, o: mlp.append(i[0].shape[1])),
        )
    ]
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        for hook in hooks:
            hook.remove()
    return attn, mlp


def tiny_gflops_by_hand(attn_tokens: list[int], mlp_tokens: list[int], width: int = 64) -> float:
    """The tiny ViT of conftest counted by hand: patch embedding (64 patches of 3x4x4), per block 4 C^2
    per attended token (qkv, proj), 8 C^2 per MLP token, 2 T^2 C for the attention matmuls; the head."""
    blocks = sum(4 * width**2 * a + 8 * width**2 * m + 2 * a * a * width for a, m in zip(attn_tokens, mlp_tokens))
    return (NUM_PATCHES * 3 * 4 * 4 * width + blocks + width * 10) / 1e9


@pytest.mark.parametrize("variant", ["class_reg4", "gap_reg4"])
@pytest.mark.parametrize("r", [0, 3, 40, (6, -1.0), (4, 0.5), [9, 0, 4, 1]])
@pytest.mark.parametrize("protect", ["prefix", "class", "apart"])
def test_flop_count_matches_the_tokens_the_forward_sees(variant, r, protect, images):
    """simulate_tokens and vit_flops against token counts read inside a real forward and FLOPs by hand."""
    model = regtome.patch.timm(make_vit(variant), r=r, protect=protect)
    attn, mlp = tokens_seen_by_the_forward(model, images)
    assert simulate_tokens(model, r, (3, 32, 32)) == (attn, mlp)
    assert regtome.vit_flops(model, (3, 32, 32)) == pytest.approx(tiny_gflops_by_hand(attn, mlp), rel=1e-12)


@pytest.mark.parametrize("class_layer,register_layer", [(2, 1), (1, 3), (0, 2), (3, 0)])
@pytest.mark.parametrize("protect", ["prefix", "class", "apart"])
@pytest.mark.parametrize("r", [6, (10, -1.0)])
def test_flop_count_follows_late_prefix_tokens(class_layer, register_layer, protect, r, images):
    """class_layer / register_layer above 0: the FLOP count sees the tokens join where the forward does."""
    model = regtome.patch.timm(
        make_vit("class_reg4"), r=r, protect=protect, class_layer=class_layer, register_layer=register_layer
    )
    attn, mlp = tokens_seen_by_the_forward(model, images)
    assert attn[0] == NUM_PATCHES + (class_layer == 0) + 4 * (register_layer == 0)  # only what has entered
    assert simulate_tokens(model, r, (3, 32, 32)) == (attn, mlp)
    assert regtome.vit_flops(model, (3, 32, 32)) == pytest.approx(tiny_gflops_by_hand(attn, mlp), rel=1e-12)


@pytest.fixture(scope="module")
def vit_s16():
    import timm

    return regtome.patch.timm(timm.create_model("vit_small_patch16_224", reg_tokens=4).eval())


def hand_gflops(attn_tokens: list[int], mlp_tokens: list[int], width: int = 384) -> float:
    """ViT-S/16 counted by hand: per block 4 C^2 per attended token (qkv, proj), 8 C^2 per MLP token,
    2 T^2 C for the attention matmuls; patch embedding and head."""
    blocks = sum(4 * width**2 * a + 8 * width**2 * m + 2 * a * a * width for a, m in zip(attn_tokens, mlp_tokens))
    return (196 * 3 * 16 * 16 * width + blocks + width * 1000) / 1e9


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7, 0.9])
def test_r_for_flops_on_vit_s16(vit_s16, fraction):
    """The FLOPs reached are counted by hand from the token counts a forward pass records."""
    r = regtome.r_for_flops(vit_s16, fraction)
    with torch.no_grad(), regtome.options(vit_s16, r=r):
        vit_s16(torch.zeros(1, 3, 224, 224))
    tokens = list(regtome.last_forward(vit_s16).tokens)
    attn_tokens = [201] + tokens[:-1]
    reached = hand_gflops(attn_tokens, tokens) / hand_gflops([201] * 12, [201] * 12)
    assert fraction - 0.05 <= reached <= fraction  # at most the budget, and close to it
    assert isinstance(r, int) or (isinstance(r, tuple) and len(r) == 2)


def test_r_for_flops_refuses_what_merging_cannot_reach():
    model = regtome.patch.timm(make_vit("class_reg4"))
    with pytest.raises(ValueError, match="below what merging reaches"):
        regtome.r_for_flops(model, 0.05)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        regtome.r_for_flops(model, 1.5)
    assert regtome.r_for_flops(model, 1.0) == 0


@pytest.mark.parametrize("protect", ["apart", "prefix", "class"])
@pytest.mark.parametrize("family", ["dinov3", "reg4_map", "diff_parallel", "rope_mixed"])
def test_token_counts_are_what_the_forward_records(family, protect):
    """regtome.token_counts (what the CLI reports, counted without a forward) against real passes, at r
    below, at and past the cap and with late prefix tokens."""
    from test_families import build, images_for

    model = build(family)
    has_registers = regtome.prefix_layout(model).num_register > 0
    regtome.patch.timm(model, protect=protect)
    images = images_for(model)
    late = dict(register_layer=1) if has_registers else dict(class_layer=1)
    for options in (dict(r=3), dict(r=(40, -1.0)), dict(r=[2, 9, 30], **late)):
        with torch.no_grad(), regtome.options(model, **options):
            model(images)
            record, counts = regtome.last_forward(model), regtome.token_counts(model)
        assert (counts.after, counts.r, counts.r_requested) == (
            list(record.tokens),
            list(record.r),
            list(record.r_requested),
        ), (family, protect, options)
