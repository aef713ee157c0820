"""regtome.patch.timm on timm models: each rule of the library's contract, one test each."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_PATCHES, TIE, VARIANTS, make_vit, matching_margin
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

import regtome
from regtome.attention import attention_with_keys

ALL_VARIANTS = list(VARIANTS) + ["distilled"]


def expected_token_counts(num_tokens: int, num_protected: int, r_per_block: list[int]) -> list[int]:
    counts = []
    for r in r_per_block:
        num_tokens -= min(r, (num_tokens - num_protected) // 2)
        counts.append(num_tokens)
    return counts


# 1. r=0 changes nothing -------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_r0_matches_unpatched(variant, images):
    model = make_vit(variant)
    if variant == "dynamic_size":
        images = torch.randn(2, 3, 48, 40)  # not the default 32x32
    with torch.no_grad():
        reference = model(images)
        regtome.patch.timm(model, r=0)
        patched = model(images)
        regtome.remove_patch(model)
        restored = model(images)
    torch.testing.assert_close(patched, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(restored, reference, atol=0, rtol=0)
    assert type(model) in (VisionTransformer, type(make_vit("distilled")))


def _record_sdpa(monkeypatch):
    calls = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append(attn_mask)
        return original(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def test_without_prop_attn_attention_stays_on_timms_fused_path(monkeypatch, images):
    model = regtome.patch.timm(make_vit(), r=8, prop_attn=False)
    calls = _record_sdpa(monkeypatch)
    with torch.no_grad():
        model(images)
    assert len(calls) == len(model.blocks) and all(mask is None for mask in calls)


def test_prop_attn_uses_sdpa_with_additive_bias_after_first_merge(monkeypatch, images):
    model = regtome.patch.timm(make_vit(), r=8, prop_attn=True)
    calls = _record_sdpa(monkeypatch)
    with torch.no_grad():
        model(images)
    assert calls[0] is None  # nothing merged yet: timm's exact call
    assert all(mask is not None and mask.is_floating_point() for mask in calls[1:])


# 2. token counts follow parse_r and the cap ------------------------------------------------------
@pytest.mark.parametrize("r", [3, 20, (8, -1.0), [30, 0, 5]])
@pytest.mark.parametrize("variant,num_prefix", [("class", 1), ("class_reg4", 5), ("gap_reg4", 4), ("distilled", 2)])
def test_token_count_after_each_block(variant, num_prefix, r, images):
    model = regtome.patch.timm(make_vit(variant), r=r, protect="prefix")
    outputs = []
    for block in model.blocks:
        block.norm2.register_forward_hook(lambda m, i, o: outputs.append(o.shape[1]))
    with torch.no_grad():
        model(images)
    expected = expected_token_counts(num_prefix + NUM_PATCHES, num_prefix, regtome.parse_r(4, r))
    assert outputs == expected
    assert model.regtome_tokens == expected
    assert model.regtome_size.shape == (3, expected[-1], 1)


# 3. protected tokens never move or grow -----------------------------------------------------------
@pytest.mark.parametrize("variant,num_prefix", [("class_reg4", 5), ("gap_reg4", 4), ("distilled", 2)])
def test_prefix_tokens_stay_put_in_every_block(variant, num_prefix, images):
    model = regtome.patch.timm(make_vit(variant), trace_source=True, protect="prefix")
    eye = torch.eye(num_prefix + NUM_PATCHES)
    for depth in range(1, len(model.blocks) + 1):
        model.r = [40] * depth  # merging stops after `depth` blocks, so the outputs show that block
        with torch.no_grad():
            model(images)
        assert model.regtome_tokens[depth - 1] < num_prefix + NUM_PATCHES
        assert torch.equal(model.regtome_size[:, :num_prefix], torch.ones(3, num_prefix, 1))
        assert torch.equal(model.regtome_source[:, :num_prefix], eye[:num_prefix].expand(3, -1, -1))
        assert model.regtome_source[:, num_prefix:, :num_prefix].sum() == 0  # nothing merged into them


def test_protect_class_lets_registers_merge(images):
    model = regtome.patch.timm(make_vit("class_reg4"), r=40, trace_source=True, protect="class")
    with torch.no_grad():
        model(images)
    source = model.regtome_source
    register_columns = source[:, :, 1:5]
    holds_register = register_columns.sum(dim=-1) > 0
    merged_rows = source.sum(dim=-1) > 1
    assert (holds_register & merged_rows).any(), "no register was merged under protect='class'"
    torch.testing.assert_close(source[:, 0], torch.eye(69)[0].expand(3, -1))  # class token still protected


# 4. sizes add up --------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,num_prefix", [("class_reg4", 5), ("gap_reg4", 4)])
def test_sizes_sum_to_patch_count(variant, num_prefix, images):
    model = regtome.patch.timm(make_vit(variant), r=(12, -0.5), trace_source=True, protect="prefix")
    with torch.no_grad():
        model(images)
    assert torch.equal(model.regtome_size[:, num_prefix:].sum(dim=1), torch.full((3, 1), float(NUM_PATCHES)))
    # a token's size is the number of inputs its source row names
    torch.testing.assert_close(model.regtome_source.sum(dim=-1, keepdim=True), model.regtome_size)


# 5. proportional attention -------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_proportional_attention_matches_explicit_softmax(fused):
    attn = make_vit().blocks[0].attn
    attn.fused_attn = fused
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 64, generator=g)
    size = torch.randint(1, 6, (2, 11, 1), generator=g).float()
    out, keys = attention_with_keys(attn, x, size)

    qkv = attn.qkv(x).reshape(2, 11, 3, 4, 16).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = q @ k.transpose(-2, -1) / 4.0 + size.log()[:, None, :, 0][:, :, None, :]
    reference = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 11, 64))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys, k.mean(dim=1))


@pytest.mark.slow
def test_autocast_bf16_keeps_sizes_fp32_and_stays_close(images):
    model = regtome.patch.timm(make_vit("gap_reg4"), r=8, protect="prefix")
    with torch.no_grad():
        reference = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images)
    assert model.regtome_size.dtype == torch.float32
    assert torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_autocast_fp16_on_cuda(images):
    model = regtome.patch.timm(make_vit("gap_reg4"), r=8).cuda()
    with torch.no_grad():
        reference = model(images.cuda())
        with torch.autocast("cuda", dtype=torch.float16):
            low = model(images.cuda())
    assert model.regtome_size.dtype == torch.float32
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()


# 6. pooling weighs tokens by size ----------------------------------------------------------------------
@pytest.mark.parametrize("include_prefix", [False, True])
def test_average_pool_is_size_weighted(include_prefix, images):
    model = regtome.patch.timm(make_vit("gap_reg4", pool_include_prefix=include_prefix), r=20, protect="prefix")
    with torch.no_grad():
        features = model.forward_features(images)
        pooled = model.forward_head(features, pre_logits=True)
    size = model.regtome_size
    skip = 0 if include_prefix else 4
    reference = (features[:, skip:] * size[:, skip:]).sum(1) / size[:, skip:].sum(1)
    torch.testing.assert_close(pooled, reference)
    assert not torch.allclose(pooled, features[:, skip:].mean(1))  # the weights matter


# 7. batch independence -------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["class_reg4", "gap_reg4"])
def test_sample_output_independent_of_batch(variant, images):
    vit = make_vit(variant)
    torch.nn.init.normal_(vit.reg_token, std=0.02)  # distinct, as training leaves them: timm starts them equal (ties)
    model = regtome.patch.timm(vit, r=(10, -1.0))
    assert matching_margin(model, images) > TIE, "a near-tie: rounding may merge differently; take other images"
    with torch.no_grad():
        together = model(images)
        alone = torch.cat([model(images[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


# 8. training ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["class_reg4", "gap_reg4", "distilled"])
def test_gradients_reach_every_parameter(variant, images):
    model = regtome.patch.timm(make_vit(variant), r=16).train()
    loss = F.cross_entropy(model(images), torch.tensor([0, 1, 2]))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient for {name}"


def test_gradient_checkpointing_gives_same_gradients(images):
    plain = regtome.patch.timm(make_vit(), r=12).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    for model in (plain, ckpt):
        model(images).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


# 9. class and registers entering late ---------------------------------------------------------------------
def test_late_prefix_tokens_skip_early_blocks(images):
    model = regtome.patch.timm(make_vit("class_reg4"), r=4, class_layer=2, register_layer=1, protect="prefix")
    seen = []
    for block in model.blocks:
        block.norm1.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    model.train()
    logits = model(images)
    # block 0: patches only; block 1: + 4 registers; block 2: + the class token
    assert seen[0] == NUM_PATCHES
    assert seen[1] == NUM_PATCHES - 4 + 4
    assert seen[2] == NUM_PATCHES - 8 + 4 + 1
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert model.cls_token.grad.abs().sum() > 0 and model.reg_token.grad.abs().sum() > 0
    assert model.regtome_size[:, :5].eq(1).all()


def test_late_prefix_tokens_are_timms_prefix_tokens(images):
    """With r=0, a class token entering at block 0 through the late path equals the plain model."""
    model = make_vit("class_reg4")
    with torch.no_grad():
        reference = model(images)
        regtome.patch.timm(model, register_layer=0, class_layer=0)
        torch.testing.assert_close(model(images), reference, atol=1e-5, rtol=0)
        model.class_layer = 3
        late = model(images)
    assert not torch.allclose(late, reference)


# 10. torch.compile ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compile_matches_eager(images):
    model = regtome.patch.timm(make_vit("gap_reg4", depth=2), r=8)
    with torch.no_grad():
        eager = model(images)
        compiled = torch.compile(model)(images)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


# bad input ------------------------------------------------------------------------------------------------
def test_unsupported_models_are_refused_clearly():
    with pytest.raises(TypeError, match="VisionTransformer"):
        regtome.patch.timm(torch.nn.Linear(2, 2))

    class CustomBlock(ResPostBlock):  # a subclass may change forward: refused, not guessed
        pass

    with pytest.raises(TypeError, match="CustomBlock"):
        regtome.patch.timm(make_vit(block_fn=CustomBlock))
    with pytest.raises(TypeError, match="AttentionPoolPrr"):
        regtome.patch.timm(make_vit(global_pool="prr"))


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(protect="registers"), "protect"),
        (dict(r=-3), "r must"),
        (dict(class_layer=4), "class_layer"),
        (dict(register_layer=1), "no register"),
    ],
)
def test_bad_options_raise_and_leave_model_unpatched(options, match):
    model = make_vit("class")
    with pytest.raises(ValueError, match=match):
        regtome.patch.timm(model, **options)
    assert type(model) is VisionTransformer


def test_bad_r_set_later_raises_at_forward(images):
    model = regtome.patch.timm(make_vit(), r=4)
    model.r = "sixteen"
    with pytest.raises(ValueError, match="r must be"):
        model(images)


def test_patching_twice_updates_options():
    model = regtome.patch.timm(make_vit(), r=4)
    regtome.patch.timm(model, r=8, protect="class")
    assert (model.r, model.protect) == (8, "class")
    regtome.remove_patch(model)
    assert type(model) is VisionTransformer and not hasattr(model, "r")


# the timm models the CLI names (random weights: no download) -----------------------------------------
@pytest.mark.parametrize(
    "name,num_prefix",
    [
        ("vit_small_patch16_224", 1),
        ("vit_base_patch16_reg4_gap_256", 4),
        ("vit_small_patch14_reg4_dinov2", 5),
    ],
)
@pytest.mark.slow
def test_named_timm_models(name, num_prefix):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    images = torch.randn(1, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        reference = model(images)
        regtome.patch.timm(model, r=0, trace_source=True)
        torch.testing.assert_close(model(images), reference, atol=1e-4, rtol=1e-4)
        model.r = 16
        merged = model(images)
    assert model.num_prefix_tokens == num_prefix and torch.isfinite(merged).all()
    expected = expected_token_counts(num_prefix + model.patch_embed.num_patches, num_prefix, [16] * len(model.blocks))
    assert model.regtome_tokens == expected
    # the default, apart: what it promises whatever merges rounding picks among near-identical registers
    # (timm starts them near zero): the class token alone, no register with a patch, sizes sum to the slots
    source = regtome.last_forward(model).source[0]
    num_class = regtome.prefix_layout(model).num_class
    holds_prefix, holds_patches = source[:, :num_prefix].sum(-1), source[:, num_prefix:].sum(-1)
    assert not ((holds_prefix > 0) & (holds_patches > 0)).any(), "a prefix token merged with a patch"
    assert torch.equal(source[:num_class], torch.eye(source.shape[-1])[:num_class])
    assert model.regtome_size.sum() == source.shape[-1]
    # protect="prefix": every prefix token at its slot, size 1
    with torch.no_grad(), regtome.options(model, protect="prefix"):
        model(images)
    assert torch.equal(model.regtome_size[:, :num_prefix], torch.ones(1, num_prefix, 1))


@pytest.mark.parametrize("options", [dict(r=4), dict(r=(4, -1.0), protect="class"), dict(r=[4, 2], prop_attn=False)])
@pytest.mark.slow
def test_torch_compile_traces_the_patched_forward_without_graph_breaks(options, images):
    """One graph: no .item()/.cpu() or value-dependent Python branches in the merge (what CUDA graphs need)."""
    model = regtome.patch.timm(make_vit("class_reg4"), **options)
    explanation = torch._dynamo.explain(model)(images)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1
