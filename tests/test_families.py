"""Every model family regtome.patch.timm accepts, on shrunk timm configs: the contract rules of
tests/test_patch.py again (r=0 is timm, merging happens, prefix kept, counts follow parse_r and the
cap, protect=class available, FLOPs by hand), plus the rotary position rule against brute force."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from cli_helpers import ROOT
from test_patch import expected_token_counts

import regtome
from regtome.blocks import MERGES_AFTER_BLOCK
from regtome.merge import bipartite_soft_matching, merge_source
from regtome.rope import initial_positions, rope_for_tokens, timm_rope_table

# family -> (timm config, shrinking overrides). Each is a kind of model timm ships.
FAMILIES = {
    "dinov3": ("vit_small_patch16_dinov3", dict(embed_dim=64, num_heads=4)),  # Eva, RoPE, 4 storage tokens
    "eva02_swiglu": ("eva02_tiny_patch14_224", dict(img_size=56)),  # Eva, 'cat' RoPE, SwiGLU
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(embed_dim=64, num_heads=4)),  # a table per block
    "rope_reg_gap": ("vit_betwixt_patch16_rope_reg4_gap_256", dict(embed_dim=64, num_heads=4)),
    "eva_post_norm": ("eva02_enormous_patch14_clip_224", dict(img_size=56, embed_dim=64, num_heads=4)),
    "pe_gqa_map": ("vit_pe_core_tiny_patch16_384", dict(img_size=64)),  # AttentionRope + map pool
    "siglip_map": ("vit_base_patch16_siglip_224", dict(embed_dim=64, num_heads=4)),  # attention pooling
    "reg4_map": ("vit_so150m_patch16_reg4_map_256", dict(embed_dim=64, num_heads=4)),
    "parallel_scaling": ("vit_base_patch16_xp_224", dict(embed_dim=64, num_heads=4)),
    "parallel_things": ("vit_small_patch16_18x2_224", dict(embed_dim=64, num_heads=4)),
    "res_post": ("vit_base_patch16_rpn_224", dict(embed_dim=64, num_heads=4)),
    "diff_attention": ("vit_dwee_patch16_reg1_gap_256", dict(embed_dim=64, num_heads=4)),
    "diff_parallel": ("vit_dpwee_patch16_reg1_gap_256", dict(embed_dim=64, num_heads=4)),
}


def build(family: str, depth: int = 3) -> nn.Module:
    name, overrides = FAMILIES[family]
    torch.manual_seed(0)
    kwargs = {**dict(depth=depth, img_size=64, num_classes=10), **overrides}
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def images_for(model: nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_r0_is_timm_and_merging_keeps_the_contract(family):
    model = build(family)
    images = images_for(model)
    with torch.no_grad():
        reference = model(images)
        regtome.patch.timm(model, r=0, trace_source=True, protect="prefix")
        torch.testing.assert_close(model(images), reference, atol=1e-5, rtol=0)
        if model.global_pool == "token" or not regtome.prefix_layout(model).num_register:
            # (average and attention pooling under protect="class" pool the registers too, by design)
            with regtome.options(model, protect="class"):
                torch.testing.assert_close(model(images), reference, atol=1e-5, rtol=0)
        r = (6, -0.5)
        model.r = r
        merged = model(images)
    record = regtome.last_forward(model)
    layout, grid = record.layout, record.source.shape[-1] - record.layout.num_prefix
    assert layout.num_prefix == model.num_prefix_tokens
    assert torch.isfinite(merged).all() and merged.shape == reference.shape
    assert list(record.tokens) == expected_token_counts(
        layout.num_prefix + grid, layout.num_prefix, regtome.parse_r(len(model.blocks), r)
    )
    assert record.tokens[-1] < layout.num_prefix + grid  # it merged
    # the prefix keeps its slots, size 1, made of itself only
    eye = torch.eye(record.source.shape[-1])[: layout.num_prefix]
    assert torch.equal(record.source[:, : layout.num_prefix], eye.expand(2, -1, -1))
    assert (record.size[:, : layout.num_prefix] == 1).all()
    torch.testing.assert_close(record.size.sum(dim=1).squeeze(-1), torch.full((2,), float(record.source.shape[-1])))


@pytest.mark.parametrize("family", ["dinov3", "reg4_map", "diff_attention"])
def test_family_protect_class_lets_registers_merge(family):
    """At the cap every A token merges, so under protect="class" the registers in set A merge; under
    protect="prefix" none does."""
    for protect, registers_merge in (("class", True), ("prefix", False)):
        model = regtome.patch.timm(build(family, depth=1), r=100, protect=protect, trace_source=True)
        with torch.no_grad():
            model(images_for(model))
        record = regtome.last_forward(model)
        registers = record.source[:, :, record.layout.num_class : record.layout.num_prefix]  # (B, T, registers)
        rows_with_register = registers.sum(dim=-1) > 0
        merged_rows = record.source.sum(dim=-1) > 1
        assert record.num_protected == record.layout.num_class + (0 if registers_merge else record.layout.num_register)
        assert bool((rows_with_register & merged_rows).any()) == registers_merge
        assert registers.sum() == registers.shape[0] * registers.shape[-1]  # every register is somewhere, once


@pytest.mark.parametrize("family", ["dinov3", "siglip_map", "parallel_scaling", "diff_parallel", "parallel_things"])
def test_family_gradients_and_training_mode(family):
    model = regtome.patch.timm(build(family), r=4)
    model.train()
    model(images_for(model)).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused


@pytest.mark.parametrize("prop_attn", [True, False])
def test_attention_pooling_weighs_merged_tokens_by_size(prop_attn):
    """'map' pooling: the latent query's logits get log(size), against a softmax written out here; also with
    prop_attn=False (an option of the blocks' attention): a pool summarizes the patches, so it counts a
    merged token as the patches it holds, as average pooling weighs it by its size."""
    model = regtome.patch.timm(build("siglip_map"), r=6, prop_attn=prop_attn)
    images = images_for(model)
    with torch.no_grad():
        features = model.forward_features(images)
        pooled = model.forward_head(features, pre_logits=True)
        record = regtome.last_forward(model)
        pool = model.attn_pool
        B, T, C = features.shape
        q = pool.q(pool.latent.expand(B, -1, -1)).reshape(B, 1, pool.num_heads, -1).transpose(1, 2)
        k, v = pool.kv(features).reshape(B, T, 2, pool.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        weights = ((q * pool.scale) @ k.transpose(-2, -1) + record.size.log().transpose(1, 2)[:, None]).softmax(-1)
        x = pool.proj((weights @ v).transpose(1, 2).reshape(B, 1, C))
        x = (x + pool.mlp(pool.norm(x)))[:, 0]
        expected = model.fc_norm(x)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-4)


def _hand_block_macs(block: nn.Module, family: str, t_in: int, t_out: int, dim: int) -> int:
    """One block's multiply-accumulates, written from timm's layer sizes for each family."""
    if family == "parallel_scaling":  # merge after the block: everything sees t_in tokens
        hidden = block.mlp_out_proj.in_features
        return t_in * (dim * (hidden + 3 * dim) + dim * dim + hidden * dim) + 2 * t_in * t_in * dim
    if family == "eva02_swiglu":  # fused qkv + proj on t_in; SwiGLU (fc1_g, fc1_x, fc2) on t_out
        hidden = block.mlp.fc2.in_features
        return t_in * (3 * dim * dim + dim * dim) + 2 * t_in * t_in * dim + t_out * (2 * dim * hidden + hidden * dim)
    raise ValueError(family)


@pytest.mark.parametrize("family", ["parallel_scaling", "eva02_swiglu", "siglip_map"])
def test_family_flops_match_a_hand_count(family):
    model = regtome.patch.timm(build(family), r=5)
    size = (3, *model.patch_embed.img_size)
    with torch.no_grad():
        model(images_for(model, 1))
    record = regtome.last_forward(model)
    dim = model.embed_dim
    patch = model.patch_embed.proj
    num_patches = (size[1] // patch.stride[0]) * (size[2] // patch.stride[1])
    expected = num_patches * 3 * patch.kernel_size[0] * patch.kernel_size[1] * dim + dim * 10  # embed + head
    tokens = [model.num_prefix_tokens + num_patches, *record.tokens]
    if family == "siglip_map":  # timm Blocks (merge between attention and MLP) + latent attention pooling
        for block, t_in, t_out in zip(model.blocks, tokens, tokens[1:]):
            hidden = block.mlp.fc1.out_features
            expected += t_in * 4 * dim * dim + 2 * t_in * t_in * dim + t_out * 2 * dim * hidden
        pool, final = model.attn_pool, tokens[-1]
        hidden = pool.mlp.fc1.out_features
        expected += final * 2 * dim * dim + dim * dim + dim * dim + 2 * dim * hidden + 2 * final * dim
    else:
        for block, t_in, t_out in zip(model.blocks, tokens, tokens[1:]):
            expected += _hand_block_macs(block, family, t_in, t_out, dim)
    assert regtome.vit_flops(model, size) == pytest.approx(expected / 1e9, rel=1e-9)
    assert isinstance(model.blocks[0], MERGES_AFTER_BLOCK) == (family == "parallel_scaling")


def test_merged_token_keeps_its_destinations_rotary_position():
    """Brute force: the merged A tokens are the r best-matched by cosine similarity (a loop here); every
    output token's position must be that of its one source that was not merged away (its destination)."""
    torch.manual_seed(0)
    batch, protected, patches, r = 2, 1, 16, 5
    metric = torch.randn(batch, protected + patches, 8)
    positions = initial_positions(batch, protected, patches, metric.device)
    merge, _ = bipartite_soft_matching(metric, r, protected)
    merged_positions = merge(positions[..., None], mode="keep")[..., 0]
    eye = torch.eye(protected + patches)[None].expand(batch, -1, -1)
    source = merge_source(merge, eye)
    for b in range(batch):
        a_slots = list(range(protected, protected + patches, 2))
        b_slots = list(range(protected + 1, protected + patches, 2))
        scores = []
        for a in a_slots:
            sims = [torch.cosine_similarity(metric[b, a], metric[b, s], dim=0).item() for s in b_slots]
            scores.append((max(sims), a))
        merged_away = {a for _, a in sorted(scores, reverse=True)[:r]}
        for token in range(source.shape[1]):
            members = torch.nonzero(source[b, token]).flatten().tolist()
            kept = [m for m in members if m not in merged_away]
            assert len(kept) == 1
            assert merged_positions[b, token].item() == positions[b, kept[0]].item()


def test_rope_rows_per_token_and_identity_for_the_prefix():
    torch.manual_seed(0)
    model = build("dinov3")
    patched = regtome.patch.timm(model)
    table = patched.regtome_embed(images_for(model), patched.regtome_num_blocks).ropes[0]
    positions = torch.tensor([[0, 3, 1, 0], [2, 0, 5, 4]])
    rows = rope_for_tokens(table, positions)
    assert rows.shape == (2, 1, 4, table.shape[-1])
    for b in range(2):
        for t in range(4):
            torch.testing.assert_close(rows[b, 0, t], table[positions[b, t]])
    sin, cos = table[0].chunk(2)
    assert (sin == 0).all() and (cos == 1).all()
    assert table.shape[0] == 1 + 16 and torch.equal(timm_rope_table(table[1:]), table)


def test_dinov3_storage_tokens_get_prefix_attention_maps():
    model = regtome.patch.timm(build("dinov3"), r=4)
    weights, names = regtome.prefix_attention(model, images_for(model), -1)
    assert names == ["class", "register 1", "register 2", "register 3", "register 4"]
    assert weights.shape == (2, 4, 5, 16) and torch.isfinite(weights).all()
    assert model.r == 4


def test_what_stays_refused_says_why():
    relpos = timm.create_model("vit_relpos_small_patch16_224", depth=1, img_size=64, num_classes=10)
    with pytest.raises(TypeError, match="relative-position"):
        regtome.patch.timm(relpos)
    eva_patch_drop = timm.create_model("vit_small_patch16_dinov3", depth=1, img_size=64, patch_drop_rate=0.5)
    with pytest.raises(TypeError, match="patch_drop_rate"):
        regtome.patch.timm(eva_patch_drop)


@pytest.mark.parametrize("preset,num_prefix", [("vit_small_patch16_dinov3", 5), ("vit_base_patch16_siglip_224", 0)])
def test_model_presets_build_patched_from_local_weights(tmp_path, preset, num_prefix):
    """configs/model presets for DINOv3 and SigLIP: built by the CLI's builder, weights from a local file."""
    from cli_helpers import compose_config

    from engine.models.build import build_model, model_label

    cfg = compose_config(
        f"model={preset}",
        "model.img_size=64",
        "+model.kwargs.depth=2",
        "+model.kwargs.embed_dim=64",
        "+model.kwargs.num_heads=4",
        "tome.r=4",
    )
    torch.manual_seed(0)
    reference = timm.create_model(cfg.model.name, img_size=64, depth=2, embed_dim=64, num_heads=4).eval()
    path = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), path)
    cfg.model.pretrained_file = str(path)
    model = build_model(cfg.model, cfg.tome, 1000).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), regtome.options(model, r=0):  # the hub configs have no head: compare pre-logits
        pooled = model.forward_head(model.forward_features(images), pre_logits=True)
        torch.testing.assert_close(
            pooled, reference.forward_head(reference.forward_features(images), pre_logits=True), atol=1e-5, rtol=0
        )
    assert model.num_prefix_tokens == num_prefix and model.r == 4
    assert model_label(cfg.model).startswith(preset)


def test_registers_setting_reaches_eva_models():
    """model.registers maps to Eva's own argument (num_reg_tokens), not the ViT one."""
    from cli_helpers import compose_config

    from engine.models.build import build_model

    cfg = compose_config(
        "model=vit_small_patch16_dinov3", "model.registers=2", "model.img_size=64", "+model.kwargs.depth=1"
    )
    model = build_model(cfg.model, cfg.tome, 10)
    assert regtome.prefix_layout(model).num_register == 2


# The graph breaks per block of the families whose keys a forward hook reads, as docs/library.md and the
# README state them (DOCUMENTED_BREAKS); every other family traces as one graph.
BREAKS_PER_BLOCK = {"parallel_scaling": 4, "diff_parallel": 4, "diff_attention": 5}
DOCUMENTED_BREAKS = "breaks the graph 4 times per parallel-scaling block and 5 times per differential-attention block"


@pytest.mark.parametrize("family", ["dinov3", "siglip_map", *BREAKS_PER_BLOCK])
@pytest.mark.slow
def test_family_compiles_with_the_graph_breaks_the_docs_state(family):
    """Eva's rotary blocks and attention pooling trace like timm's Block: one graph, no breaks. The parallel-scaling
    and differential blocks break it a fixed number of times per block, counted here, stated so in the docs."""
    depth = 2
    model = regtome.patch.timm(build(family, depth=depth), r=(4, -1.0))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(images_for(model))
    breaks = BREAKS_PER_BLOCK.get(family, 0) * depth
    assert explanation.graph_break_count == breaks and explanation.graph_count == breaks + 1
    for doc in (ROOT / "README.md", ROOT / "docs" / "library.md"):
        assert DOCUMENTED_BREAKS in " ".join(doc.read_text().split()), doc.name


def test_dinov3_other_image_sizes_and_dense_features():
    """dynamic_img_size (DINOv3's default): another grid at r=0 is timm's; forward_intermediates keeps timm's shapes."""
    model = build("dinov3")
    images = torch.randn(2, 3, 80, 48, generator=torch.Generator().manual_seed(2))  # a 5x3 grid, not 4x4
    with torch.no_grad():
        reference = model(images)
        timm_final, timm_maps = model.forward_intermediates(images, indices=[0, 2], return_prefix_tokens=True)
        regtome.patch.timm(model, r=0)
        torch.testing.assert_close(model(images), reference, atol=1e-5, rtol=0)
        with regtome.options(model, r=3):
            final, maps = model.forward_intermediates(images, indices=[0, 2], return_prefix_tokens=True)
            assert regtome.last_forward(model).tokens[-1] < 5 + 15
    assert final.shape == timm_final.shape
    for (spatial, prefix), (timm_spatial, timm_prefix) in zip(maps, timm_maps):
        assert spatial.shape == timm_spatial.shape == (2, 64, 5, 3) and prefix.shape == timm_prefix.shape
    with torch.no_grad():
        _, maps_r0 = model.forward_intermediates(images, indices=[0, 2], return_prefix_tokens=True)
    for (spatial, prefix), (timm_spatial, timm_prefix) in zip(maps_r0, timm_maps):
        torch.testing.assert_close(spatial, timm_spatial, atol=1e-5, rtol=0)
        torch.testing.assert_close(prefix, timm_prefix, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["dinov3", "siglip_map"])
def test_family_under_bf16_autocast_keeps_sizes_fp32(family):
    model = regtome.patch.timm(build(family), r=4)
    images = images_for(model)
    with torch.no_grad():
        full = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(images)
    assert regtome.last_forward(model).size.dtype == torch.float32
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), full, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("family", ["dinov3", "parallel_scaling"])
def test_family_gradient_checkpointing_gives_the_same_gradients(family):
    grads = []
    for checkpointing in (False, True):
        model = regtome.patch.timm(build(family), r=4)
        model.set_grad_checkpointing(checkpointing)
        model.train()
        model(images_for(model)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)


def test_dinov3_prefix_attention_matches_timms_own_attention():
    """Brute force: capture the input and rope timm's own forward hands to the attention, rotate the
    patch tokens as timm does (prefix unrotated), softmax; RegToMe's maps must be the same."""
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    reference = build("dinov3")
    images = images_for(reference)
    block = 1
    captured = {}
    attn = reference.blocks[block].attn
    handle = attn.register_forward_pre_hook(
        lambda m, args, kwargs: captured.update(x=args[0], rope=kwargs["rope"]), with_kwargs=True
    )
    with torch.no_grad():
        reference(images)
        handle.remove()
        B, T, _ = captured["x"].shape
        q, k, _ = attn.qkv(captured["x"]).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        n = reference.num_prefix_tokens
        q = torch.cat([q[:, :, :n], apply_rot_embed_cat(q[:, :, n:], captured["rope"], half=True)], dim=2)
        k = torch.cat([k[:, :, :n], apply_rot_embed_cat(k[:, :, n:], captured["rope"], half=True)], dim=2)
        expected = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, :n, n:]
        model = regtome.patch.timm(reference, r=4)
        weights, _ = regtome.prefix_attention(model, images, block)
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-4)
