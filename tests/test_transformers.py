"""regtome.patch.transformers on tiny random Hugging Face configs (no network): the timm contract again.

r=0 is transformers' output under each attention implementation, merging happens, prefix tokens never
merge, outputs keep transformers' shapes, heads read the full grid, dense output against a brute-force
unmerge, compile, protection modes, refusals.
"""

from __future__ import annotations

import csv

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    SiglipForImageClassification,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

import regtome  # noqa: E402
from regtome.layout import PATCH, REGISTER  # noqa: E402

TINY = dict(
    hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=4
)
# name -> (class, config, class tokens, registers)
MODELS = {
    "vit": (ViTModel, lambda: ViTConfig(**TINY), 1, 0),
    "vit_classifier": (ViTForImageClassification, lambda: ViTConfig(**TINY, num_labels=10), 1, 0),
    "deit": (DeiTModel, lambda: DeiTConfig(**TINY), 2, 0),
    "deit_teacher": (DeiTForImageClassificationWithTeacher, lambda: DeiTConfig(**TINY, num_labels=10), 2, 0),
    "dinov2": (Dinov2Model, lambda: Dinov2Config(**TINY), 1, 0),
    "dinov2_classifier": (Dinov2ForImageClassification, lambda: Dinov2Config(**TINY, num_labels=10), 1, 0),
    "dinov2_reg": (Dinov2WithRegistersModel, lambda: Dinov2WithRegistersConfig(**TINY, num_register_tokens=4), 1, 4),
    "dinov2_reg_classifier": (
        Dinov2WithRegistersForImageClassification,
        lambda: Dinov2WithRegistersConfig(**TINY, num_register_tokens=4, num_labels=10),
        1,
        4,
    ),
    "dinov3": (DINOv3ViTModel, lambda: DINOv3ViTConfig(**TINY, num_register_tokens=4), 1, 4),
    "siglip": (SiglipVisionModel, lambda: SiglipVisionConfig(**TINY), 0, 0),
    "siglip_classifier": (
        SiglipForImageClassification,
        lambda: __import__("transformers").SiglipConfig(vision_config=TINY, num_labels=10),
        0,
        0,
    ),
}
BASES = ["vit", "deit", "dinov2", "dinov2_reg", "dinov3", "siglip"]


def build(name: str, attn: str = "sdpa", seed: int = 0):
    cls, config, _, _ = MODELS[name]
    config = config()
    config._attn_implementation = attn
    if hasattr(config, "vision_config"):
        config.vision_config._attn_implementation = attn
    torch.manual_seed(seed)
    return cls(config).eval()


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def main_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(MODELS))
def test_r0_is_transformers_and_merging_keeps_its_shapes(name, attn):
    model = build(name, attn)
    x = images()
    with torch.no_grad():
        reference = model(x)
        regtome.patch.transformers(model, r=0)
        patched = model(x)
        torch.testing.assert_close(main_output(patched), main_output(reference), atol=1e-5, rtol=0)
        if getattr(reference, "pooler_output", None) is not None:
            torch.testing.assert_close(patched.pooler_output, reference.pooler_output, atol=1e-5, rtol=0)
        model.r = 4
        merged = model(x)
        record = regtome.last_forward(model)
        regtome.remove_patch(model)
        restored = model(x)
    assert main_output(merged).shape == main_output(reference).shape and torch.isfinite(main_output(merged)).all()
    assert all(a > b for a, b in zip((record.tokens[0] + 4,) + record.tokens, record.tokens))  # merging happened
    assert torch.equal(main_output(restored), main_output(reference))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_the_configured_attention_implementation_runs_with_the_size_bias(attn, monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    calls = []
    original = ALL_ATTENTION_FUNCTIONS.get_interface

    def spy(implementation, default):
        function = original(implementation, default)

        def recorded(module, q, k, v, mask, **kwargs):
            calls.append((implementation, mask))
            return function(module, q, k, v, mask, **kwargs)

        return recorded

    monkeypatch.setattr(ALL_ATTENTION_FUNCTIONS, "get_interface", spy)
    model = regtome.patch.transformers(build("dinov2_reg", attn), r=8)
    with torch.no_grad():
        model(images())
    assert [c[0] for c in calls] == [attn] * 3
    assert calls[0][1] is None  # no merge yet: the model's exact call
    sizes = regtome.trace(model, images(), [0]).blocks[0].size
    torch.testing.assert_close(calls[1][1], sizes.log().transpose(1, 2)[:, None])  # log(size) on every key


@pytest.mark.parametrize("name", BASES)
def test_prefix_tokens_never_merge_and_each_slot_is_its_holders_features(name):
    """Brute force on the full grid: slot n of last_hidden_state is the final norm of the token holding n."""
    _, _, num_class, num_register = MODELS[name]
    model = regtome.patch.transformers(build(name), r=6, trace_source=True, protect="prefix")
    x = images()
    with torch.no_grad():
        out = model(x)
        record = regtome.last_forward(model)
        merged, _ = model.regtome_features(x)
    p = num_class + num_register
    source = record.source
    assert torch.equal(source[:, :p, :p], torch.eye(p).expand(2, -1, -1))  # prefix rows: themselves, alone
    assert torch.equal(record.size[:, :p], torch.ones(2, p, 1))
    norm = getattr(model, {"siglip": "post_layernorm", "dinov3": "norm"}.get(name, "layernorm"))
    with torch.no_grad():
        final = norm(merged)
    for b in range(2):
        for slot in range(source.shape[-1]):
            holder = int(source[b, :, slot].argmax())
            torch.testing.assert_close(out.last_hidden_state[b, slot], final[b, holder], atol=1e-5, rtol=1e-5)


def test_patch_mean_heads_average_by_size():
    """Dinov2's classifier averages the patch slots: on the full grid that is the size-weighted mean."""
    model = regtome.patch.transformers(build("dinov2_classifier"), r=8, trace_source=True)
    x = images()
    with torch.no_grad():
        logits = model(x).logits
        merged, record = model.regtome_features(x)
        final = model.dinov2.layernorm(merged)
    size = record.size
    patches, weights = final[:, 1:], size[:, 1:]
    mean = (patches * weights).sum(1) / weights.sum(1)
    expected = model.classifier(torch.cat([final[:, 0], mean], dim=1))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_siglip_attention_pooling_is_proportional_attention():
    """The probe attends over the grid, where a token held s times counts s times: log(size) on merged keys."""
    model = regtome.patch.transformers(build("siglip"), r=8)
    x = images()
    with torch.no_grad():
        pooled = model(x).pooler_output
        merged, record = model.regtome_features(x)
        final = model.post_layernorm(merged)
        head = model.head
        probe = head.probe.repeat(2, 1, 1)
        bias = record.size.log().transpose(1, 2).repeat_interleave(head.attention.num_heads, 0)
        attended = head.attention(probe, final, final, attn_mask=bias.to(final.dtype))[0]
        expected = (attended + head.mlp(head.layernorm(attended)))[:, 0]
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["dinov2_reg", "dinov3"])
def test_protection_modes_on_register_models(name):
    model = regtome.patch.transformers(build(name), r=12, trace_source=True)
    x = images()
    held = {}
    for protect in regtome.PROTECT_MODES:
        with torch.no_grad(), regtome.options(model, protect=protect):
            model(x)
        record = regtome.last_forward(model)
        registers = record.source[:, :, 1:5].sum(-1)
        patches = record.source[:, :, 5:].sum(-1)
        held[protect] = ((registers > 0) & (patches > 0)).sum().item()
        if protect == "apart":
            assert (record.kind[registers > 0] == REGISTER).all() and (record.kind[patches > 0] == PATCH).all()
    assert held["prefix"] == 0 and held["apart"] == 0


def test_dinov3_merged_tokens_keep_their_destinations_rotation_and_prefix_stays_unrotated():
    """Against transformers' own rotary attention: with r=0 at every layer the mirror is exact (tested above);
    here the positions carried through a merge are rows of the table, and the prefix rows the identity."""
    model = regtome.patch.transformers(build("dinov3"), r=10, protect="apart")
    seen = []
    original = type(model).regtome_block_forward  # the patched-model hook every layer runs through

    def spy(layer, tokens, *args):
        seen.append((tokens.kind.clone(), tokens.position.clone()))
        return original(layer, tokens, *args)

    type(model).regtome_block_forward = staticmethod(spy)
    try:
        with torch.no_grad():
            model(images())
    finally:
        type(model).regtome_block_forward = staticmethod(original)
    assert seen, "the spy saw no layer"
    for kind, position in seen:
        assert (position[kind != PATCH] == 0).all() and (position[kind == PATCH] >= 1).all()
        assert (position <= 64).all()


def test_hidden_states_on_the_grid_and_attentions_refused():
    model = regtome.patch.transformers(build("dinov2_reg"), r=6)
    with torch.no_grad():
        out = model(images(), output_hidden_states=True)
        embeddings = model.embeddings(images())
    assert len(out.hidden_states) == 4 and all(h.shape == (2, 69, 64) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[0], embeddings)
    with pytest.raises(ValueError, match="output_attentions is not available"):
        model(images(), output_attentions=True)


def test_options_record_and_removal_through_a_classification_model():
    model = regtome.patch.transformers(build("vit_classifier"), r=4)
    assert model.r == 4 and model.vit.r == 4
    with regtome.options(model, r=8, protect="class"):
        with torch.no_grad():
            model(images())
        assert regtome.last_forward(model).r == (8, 8, 8) and model.vit.protect == "class"
    assert model.r == 4 and model.vit.protect == regtome.DEFAULT_PROTECT == "apart"
    # the record's read-only views are the same on both sources, through the classifier too
    record = regtome.last_forward(model)
    assert model.regtome_size is record.size and model.regtome_source is record.source is None
    assert model.regtome_tokens == list(record.tokens) and model.vit.regtome_tokens == model.regtome_tokens
    model.r = (6, -1.0)
    assert model.vit.r == (6, -1.0)
    assert regtome.vit_flops(model, (3, 32, 32)) < regtome.schedule_gflops(model, 0, (3, 32, 32))
    regtome.remove_patch(model)
    assert type(model) is ViTForImageClassification and type(model.vit) is ViTModel


def test_flops_follow_the_token_counts():
    model = regtome.patch.transformers(build("dinov2_reg"), r=(8, -1.0))
    with torch.no_grad():
        model(images())
    _, mlp_tokens = regtome.flops.simulate_tokens(model, model.r, (3, 32, 32))
    assert mlp_tokens == list(regtome.last_forward(model).tokens)
    fraction = 0.7
    r = regtome.r_for_flops(model, fraction)
    assert regtome.schedule_gflops(model, r, (3, 32, 32)) <= fraction * regtome.schedule_gflops(model, 0, (3, 32, 32))


@pytest.mark.parametrize("protect", ["apart", "prefix"])
@pytest.mark.parametrize("name", ["dinov2_reg", "dinov3", "vit_classifier"])
def test_token_counts_are_what_the_forward_records(name, protect):
    """regtome.token_counts (what the CLI's results.json reports) against real passes of transformers models."""
    model = regtome.patch.transformers(build(name), protect=protect)
    has_registers = regtome.prefix_layout(model).num_register > 0
    late = dict(register_layer=1) if has_registers else dict(class_layer=1)
    for options in (dict(r=3), dict(r=(40, -1.0)), dict(r=[2, 9, 30], **late)):
        with torch.no_grad(), regtome.options(model, **options):
            model(images())
            record, counts = regtome.last_forward(model), regtome.token_counts(model, (3, 32, 32))
        assert (counts.after, counts.r, counts.r_requested) == (
            list(record.tokens),
            list(record.r),
            list(record.r_requested),
        ), (name, protect, options)


@pytest.mark.parametrize("name", ["dinov2_reg", "dinov3", "siglip"])
@pytest.mark.slow
def test_compiles_to_one_graph(name):
    model = regtome.patch.transformers(build(name), r=(4, -1.0), protect="apart")
    explanation = torch._dynamo.explain(model)(images())
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_what_is_refused_says_why():
    with pytest.raises(TypeError, match="supports ViTModel, DeiTModel.*got CLIPVisionModel"):
        regtome.patch.transformers(CLIPVisionModel(CLIPVisionConfig(**TINY)))
    model = build("vit")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(TypeError, match="attn_implementation='flash_attention_2' cannot take .*='sdpa' or 'eager'"):
        regtome.patch.transformers(model)
    assert type(model) is ViTModel
    with pytest.raises(ValueError, match="protect must be one of"):
        regtome.patch.transformers(build("vit_classifier"), protect="none")
    patched = regtome.patch.transformers(build("vit"), r=2)
    with pytest.raises(ValueError, match="does not merge masked inputs"):
        patched(images(), bool_masked_pos=torch.zeros(2, 64, dtype=torch.bool))


@pytest.mark.slow
def test_cli_preset_with_local_weights_trains_evaluates_and_visualizes(tmp_path):
    """model=hf_dinov2_reg4_small with model.pretrained_dir: a save_pretrained folder, no network."""
    from cli_helpers import SMOKE, results, run_main

    build("dinov2_reg").save_pretrained(tmp_path / "weights")
    common = [
        "model=hf_dinov2_reg4_small",
        f"model.pretrained_dir={tmp_path / 'weights'}",
        "model.img_size=32",
        *[o for o in SMOKE if not o.startswith("model")],
    ]
    run_main(
        "task=train",
        *common,
        "trainer.epochs=1",
        "tome.protect=apart",
        f"hydra.run.dir={tmp_path / 'train'}",
        cwd=tmp_path,
    )
    record = results(tmp_path / "train")
    assert record["model"] == "hf-facebook--dinov2-with-registers-small-32px" and record["registers"] == 4
    assert record["protect"] == "apart" and record["tokens_per_block"] == [67, 65, 63]
    run_main(
        "task=eval",
        f"ckpt={tmp_path / 'train' / 'checkpoints' / 'best.pt'}",
        "tome.r=6",
        "runtime.device=cpu",
        cwd=tmp_path,
    )
    (run,) = (tmp_path / "outputs" / "eval" / "synthetic_hf-facebook--dinov2-with-registers-small-32px").iterdir()
    evaluated = results(run)
    assert evaluated["r_per_block"] == [6, 6, 6]
    with open(run / "predictions.csv") as f:  # top-1 is what the per-sample predictions say
        correct = [int(row["correct"]) for row in csv.DictReader(f)]
    assert len(correct) == 64 and evaluated["top1"] == pytest.approx(100 * sum(correct) / len(correct))
    run_main(
        "task=visualize",
        *common,
        "visualize.num_samples=1",
        "visualize.blocks=[0,2]",
        f"hydra.run.dir={tmp_path / 'vis'}",
        cwd=tmp_path,
    )
    assert (tmp_path / "vis" / "sample_0.png").exists() and (tmp_path / "vis" / "sample_0_features.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_the_cli_builder_sets_the_attention_implementation_of_every_module(implementation):
    """model.attn_implementation reaches every module through transformers' public argument."""
    from cli_helpers import ROOT
    from omegaconf import OmegaConf

    from engine.models.build import create_transformers_model
    from regtome.upstream_hf import attn_implementation

    preset = OmegaConf.load(ROOT / "configs" / "model" / "hf_dinov2_reg4_small.yaml")
    cfg = OmegaConf.merge(
        {"pretrained_dir": None, "kwargs": {}},
        preset,
        {"img_size": 32, "pretrained": False},
        {"attn_implementation": implementation},
    )
    model = create_transformers_model(cfg, 10)
    configs = {
        attn_implementation(m.config)
        for m in model.modules()
        if hasattr(getattr(m, "config", None), "_attn_implementation")
    }
    assert configs == {implementation}
