"""Dense features on the full grid (forward_intermediates) and r from a FLOP budget."""
import pytest
import torch

import regtome
from conftest import NUM_PATCHES, make_vit
from regtome.budget import simulate_tokens


@pytest.mark.parametrize("variant", ["class_reg4", "gap_reg4", "distilled", "dynamic_size"])
@pytest.mark.parametrize("kwargs", [dict(indices=2), dict(indices=[0, 3], output_fmt="NLC", norm=True),
                                    dict(return_prefix_tokens=True, intermediates_only=True),
                                    dict(output_dict=True, return_prefix_tokens=True)])
def test_forward_intermediates_at_r0_is_timm(variant, kwargs, images):
    expected = make_vit(variant).forward_intermediates(images, **kwargs)
    got = regtome.patch.timm(make_vit(variant), r=0).forward_intermediates(images, **kwargs)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(indices=2), dict(indices=[0, 3], output_fmt="NLC", norm=True),
                                    dict(return_prefix_tokens=True, intermediates_only=True),
                                    dict(output_dict=True, return_prefix_tokens=True), dict(stop_early=True, indices=[1])])
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
    model = regtome.patch.timm(make_vit("class_reg4"), r=12, trace_source=True)
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


@pytest.mark.parametrize("variant", ["class_reg4", "gap_reg4", "distilled"])
@pytest.mark.parametrize("r", [0, 3, 40, (6, -1.0), (4, 0.5), [9, 0, 4, 1]])
def test_simulated_token_counts_match_the_model(variant, r, images):
    model = regtome.patch.timm(make_vit(variant), r=r, protect="class")
    model(images[:1])
    attn, mlp = simulate_tokens(model, r, (3, 32, 32))
    assert tuple(mlp) == regtome.last_forward(model).tokens
    assert regtome.schedule_gflops(model, r, (3, 32, 32)) == pytest.approx(regtome.vit_flops(model, (3, 32, 32)))


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
