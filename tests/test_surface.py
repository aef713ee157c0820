"""The library's explicit surface: options(), last_forward(), pooling within one call, prefix_attention."""

import pytest
import torch
from conftest import NUM_PATCHES, make_vit

import regtome


def test_options_apply_for_a_block_and_restore_on_exit_and_error(images):
    model = regtome.patch.timm(make_vit("class_reg4"), r=2, protect="prefix")
    with regtome.options(model, r=8, protect="class", prop_attn=False) as same:
        assert same is model and (model.r, model.protect, model.prop_attn) == (8, "class", False)
        model(images)
        assert regtome.last_forward(model).r == (8, 8, 8, 8)
    assert (model.r, model.protect, model.prop_attn) == (2, "prefix", True)
    with pytest.raises(ZeroDivisionError):
        with regtome.options(model, r=4):
            raise ZeroDivisionError
    assert model.r == 2
    with pytest.raises(ValueError, match="protect must be one of"):
        with regtome.options(model, r=4, protect="registers"):
            pass
    assert (model.r, model.protect) == (2, "prefix")  # an invalid change leaves everything as it was
    with pytest.raises(TypeError, match="unknown RegToMe option"):
        with regtome.options(model, ratio=0.5):
            pass
    with pytest.raises(TypeError, match="patched with regtome.patch.timm"):
        with regtome.options(make_vit(), r=1):
            pass


def test_last_forward_records_the_applied_r_after_the_cap(images):
    model = regtome.patch.timm(make_vit("class_reg4"), r=40, protect="prefix")
    model(images)
    record = regtome.last_forward(model)
    tokens, applied = 5 + NUM_PATCHES, []
    for _ in range(4):  # the cap: half of the mergeable (non-prefix) tokens
        applied.append(min(40, (tokens - 5) // 2))
        tokens -= applied[-1]
    assert record.r == tuple(applied) and record.tokens[-1] == tokens
    assert record.layout == regtome.PrefixLayout(num_class=1, num_register=4) and record.num_protected == 5
    assert record.size.shape == (3, tokens, 1) and record.source is None
    with pytest.raises(RuntimeError, match="has not run"):
        regtome.last_forward(regtome.patch.timm(make_vit("class_reg4")))


def test_pooling_uses_the_sizes_of_its_own_call(images):
    """A gap model pools by size: forward() hands its own sizes to the pool, whatever ran before."""
    model = regtome.patch.timm(make_vit("gap_reg4"), r=8)
    expected = model(images)
    with regtome.options(model, r=2):
        model(images[:1])  # another batch and token count in between
    features = model.forward_features(images)
    torch.testing.assert_close(model.forward_head(features), expected)
    model(images[:1])
    with pytest.raises(RuntimeError, match="call forward_features on the same input first"):
        model.forward_head(features)  # sizes of another call: refused, never silently wrong
    torch.testing.assert_close(model(images), expected)


def brute_force_prefix_attention(model, images, block):
    """Unpatched timm model: run blocks one by one, then softmax(q k^T * scale) of the prefix rows."""
    with torch.no_grad():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for blk in model.blocks[:block]:
            x = blk(x)
        attn = model.blocks[block].attn
        y = model.blocks[block].norm1(x)
        B, T, C = y.shape
        qkv = attn.qkv(y).reshape(B, T, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        weights = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
    p = model.num_prefix_tokens
    return weights[:, :, :p, p:]


@pytest.mark.parametrize("variant", ["class_reg4", "qk_norm", "distilled"])
def test_prefix_attention_matches_a_brute_force_reference(variant, images):
    reference_model = make_vit(variant)
    expected = brute_force_prefix_attention(reference_model, images, 2)
    model = regtome.patch.timm(make_vit(variant), r=8)
    weights, names = regtome.prefix_attention(model, images, 2)
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-4)
    assert len(names) == model.num_prefix_tokens and model.r == 8  # r restored
    assert names[0] in ("class",) and (variant != "distilled" or names[1] == "distill")
    assert all(n.startswith("register") for n in names[len(names) - int(model.num_reg_tokens) :])


def test_the_engine_uses_only_the_librarys_surface():
    """No engine/ or scripts/ file assigns a patched model's options or reaches into timm's attention."""
    import ast
    from pathlib import Path

    from regtome.patch_options import OPTIONS

    root = Path(__file__).resolve().parents[1]
    paths = [*root.glob("engine/**/*.py"), *root.glob("scripts/*.py"), root / "main.py"]
    assert len(paths) > 40 and root / "engine" / "tasks" / "train.py" in paths  # every engine file, not the top
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, (ast.AugAssign, ast.AnnAssign))
                else []
            )
            for target in targets:
                is_config = isinstance(target, ast.Attribute) and "cfg" in ast.unparse(target.value)
                assert is_config or not (isinstance(target, ast.Attribute) and target.attr in OPTIONS), (
                    f"{path.name}:{node.lineno} assigns .{target.attr}; use regtome.options"
                )
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("qkv", "q_norm", "k_norm", "fused_attn"), (
                    f"{path.name}:{node.lineno} touches timm attention internals (.{node.attr})"
                )


def test_importing_main_has_no_side_effects():
    import subprocess
    import sys

    from cli_helpers import ROOT

    code = (
        "import sys; argv = list(sys.argv); import main; from omegaconf import OmegaConf; "
        "assert sys.argv == argv; assert not OmegaConf.has_resolver('run_id'); "
        "import os; assert 'REGTOME_RUN_ID' not in os.environ; print('clean')"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "REGTOME_RUN_ID"}
    out = subprocess.run(
        [sys.executable, "-c", code, "-m", "task=bogus"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "clean", out.stderr[-2000:]


def test_model_build_errors_blame_weights_only_when_weights_were_loaded(monkeypatch):
    import timm
    from cli_helpers import SMOKE, compose_config

    from engine.errors import UserError
    from engine.models.build import build_model

    def broken(*args, **kwargs):
        raise RuntimeError("size mismatch for blocks.0.attn.qkv.weight")

    monkeypatch.setattr(timm, "create_model", broken)
    cfg = compose_config(*SMOKE)
    with pytest.raises(UserError, match="cannot build .* check model.kwargs") as err:
        build_model(cfg.model, cfg.tome, 4)
    assert "pretrained" not in str(err.value)
    cfg = compose_config(*SMOKE, "model.pretrained=true")
    with pytest.raises(UserError, match="pretrained weights do not fit"):
        build_model(cfg.model, cfg.tome, 4)


@pytest.mark.slow
def test_only_the_library_is_installed_and_it_has_one_version(tmp_path):
    """pip install -e . puts `regtome` in the environment and nothing named `engine` or `data`."""
    import subprocess
    import sys

    code = (
        "import importlib.metadata as m, importlib.util as u, regtome; "
        "print(m.version('regtome'), regtome.__version__, u.find_spec('engine'), u.find_spec('data'))"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    assert out[0] == out[1] and out[2:] == ["None", "None"]


def test_the_default_protection_is_apart_everywhere():
    """One default (regtome.DEFAULT_PROTECT), read by both patches and stated by the CLI's tome group."""
    from cli_helpers import compose_config

    assert regtome.DEFAULT_PROTECT == "apart" and regtome.DEFAULT_PROTECT in regtome.PROTECT_MODES
    assert regtome.patch.timm(make_vit("class_reg4")).protect == regtome.DEFAULT_PROTECT
    assert compose_config().tome.protect == regtome.DEFAULT_PROTECT


def test_the_core_never_imports_the_patch_layer():
    """regtome/*.py (the core) imports nothing of regtome/patch/: the patch layer sits on top of it."""
    import ast
    from pathlib import Path

    core = Path(__file__).resolve().parents[1] / "regtome"
    for path in sorted(core.glob("*.py")):
        if path.name == "__init__.py":  # the package's entry re-exports the patch layer's names
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):  # from .patch import x, from . import patch, from regtome.patch ...
                module = "." * node.level + (node.module or "")
                names = [f"{module}.{alias.name}" for alias in node.names] if node.module is None else [module]
                for name in names:
                    assert not imports_patch(name.lstrip(".")), f"{path.name} imports {name}"
            if isinstance(node, ast.Import):  # import regtome.patch
                for alias in node.names:
                    assert not imports_patch(alias.name), f"{path.name} imports {alias.name}"


def imports_patch(module: str) -> bool:
    """True for regtome.patch and its modules ('patch', 'patch.api', 'regtome.patch.base'; not 'patch_options')."""
    parts = module.split(".")
    return parts[:1] == ["patch"] or parts[:2] == ["regtome", "patch"]
