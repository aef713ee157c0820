"""The configuration's one typed schema: a dataclass per config group, in Hydra's ConfigStore as `schema` (first in
configs/config.yaml's defaults; the YAML presets fill it), so OmegaConf checks every key's type and words at
composition. What a type cannot say is a `check` in a field's metadata (one key) or in `validate` (several keys).
Each field's `help` is its line in docs/cli.md (scripts/config_reference.py). Importing it loads no torch."""

from __future__ import annotations

import enum
from dataclasses import Field, dataclass, field, fields, is_dataclass
from typing import Any, Callable, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import UserError, first_line
from .models.tome_group import merge_amount, r_option
from .task_table import TASKS


class Words(str, enum.Enum):
    """Closed words: a member equals its word and prints as it (str, so format): `outputs/${task}` is outputs/train."""

    def __str__(self) -> str:
        return self.name


# Closed sets of words, as OmegaConf enums (the functional form takes names such as `class` and `torch_export`).
PROTECT_MODES = ("apart", "prefix", "class")  # regtome.PROTECT_MODES (tests/test_schema.py compares them)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
Task = Words("Task", [(name, name) for name in TASKS])  # type: ignore[misc]
Protect = Words("Protect", [(name, name) for name in PROTECT_MODES])  # type: ignore[misc]
Source = Words("Source", [(name, name) for name in ("timm", "transformers")])  # type: ignore[misc]
Device = Words("Device", [(name, name) for name in ("auto", "cuda", "cpu")])  # type: ignore[misc]
Amp = Words("Amp", [(name, name) for name in ("auto", "bf16", "fp16", "off")])  # type: ignore[misc]
ExportFormat = Words("ExportFormat", [(name, name) for name in ("onnx", "torch_export")])  # type: ignore[misc]
ExportDtype = Words("ExportDtype", [(name, name) for name in ("fp32", "fp16")])  # type: ignore[misc]
DATASET_NAMES = ("cifar10", "cifar100", "imagenet", "imagefolder", "synthetic")  # data.datasets.DATASETS (a test)
DatasetName = Words("DatasetName", [(name, name) for name in DATASET_NAMES])  # type: ignore[misc]
Attention = Words("Attention", [(name, name) for name in ("eager", "sdpa")])  # type: ignore[misc]


# Checks of one value: None when it is fine, else what the key takes.
Check = Callable[[Any], Optional[str]]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def at_least(low: float) -> Check:
    return lambda v: None if v is None or (_number(v) and v >= low) else f"a number >= {low:g}"


def above(low: float) -> Check:
    return lambda v: None if v is None or (_number(v) and v > low) else f"a number > {low:g}"


def fraction(v: Any) -> Optional[str]:
    return None if v is None or (_number(v) and 0 < v <= 1) else "a fraction in (0, 1]"


def _r(value: Any) -> Optional[str]:
    try:
        if value is not None:
            r_option(value)
    except UserError as err:
        return f"an r as regtome reads it ({str(err).split(': ', 1)[-1]})"
    return None


def _r_list(value: Any) -> Optional[str]:
    values = value if isinstance(value, list) else [value]  # checks get plain values (to_container)
    return next(filter(None, map(_r, values)), None)  # the first problem


def _modes(value: Any) -> Optional[str]:
    values = value if isinstance(value, list) else [value]
    if value is None or all(v in PROTECT_MODES for v in values):
        return None
    return f"a protection mode or a list of them: {', '.join(PROTECT_MODES)}"


def _compile(value: Any) -> Optional[str]:
    if value is None or isinstance(value, bool) or value in COMPILE_MODES:
        return None
    return f"false, true or a torch.compile mode: {', '.join(COMPILE_MODES)}"


def _export_batch(value: Any) -> Optional[str]:
    ok = value == "dynamic" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    return None if ok else "dynamic or an int >= 1"


def key(default: Any, help: str, check: Optional[Check] = None, kind: Optional[str] = None) -> Any:
    """A schema field: its default (MISSING where every preset gives its own), help, check, and for an `Any` key
    what it takes in words."""
    metadata = {"help": help, "check": check, "kind": kind}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default.copy(), metadata=metadata)
    return field(default=default, metadata=metadata)


NORMALIZATION = (
    "normalization for a model trained from scratch; null (and any pretrained model): the model's own (timm's data "
    "config, or the transformers image processor's)"
)


@dataclass
class DatasetConfig:
    name: DatasetName = key(MISSING, "set by the group (`dataset=cifar10`); read by the code, not set by hand")
    root: Optional[str] = key(
        MISSING,
        "CIFAR: where it is downloaded (datasets/CIFAR10; $REGTOME_DATASETS moves datasets/); ImageNet, image folders: "
        "a folder with train/ and val/ (or test/) class folders, required",
    )
    download: bool = key(False, "download CIFAR on first use")
    num_classes: Optional[int] = key(
        None, "null: counted from the class folders (train/, else val/ or test/)", at_least(1)
    )
    native_size: Optional[int] = key(
        None,
        "the images' own size (null: read from the images); at most 64 px and below model.img_size: augmented at that "
        "size and resized on the device",
        at_least(1),
    )
    mean: Optional[List[float]] = key(None, NORMALIZATION)
    std: Optional[List[float]] = key(None, NORMALIZATION)
    skip_unreadable: bool = key(
        False,
        "image folders: skip a training image that cannot be read (a log line each, with the count) instead of "
        "stopping the run naming it; also on a resume",
    )
    train_size: Optional[int] = key(None, "synthetic only: training images", at_least(1))
    val_size: Optional[int] = key(None, "synthetic only: validation images", at_least(1))
    noise: Optional[float] = key(None, "synthetic only: the noise on the class patterns", at_least(0))


@dataclass
class ModelConfig:
    source: Source = key(Source.timm, "timm or transformers")
    name: str = key(MISSING, "any timm ViT name, or a Hugging Face hub id (model.source=transformers)")
    registers: Optional[int] = key(
        None,
        "timm only: register tokens (reg_tokens, Eva's num_reg_tokens); null keeps the model's own; a transformers "
        "model refuses it",
        at_least(0),
    )
    img_size: int = key(MISSING, "the model's input size", at_least(1))
    pretrained: bool = key(False, "the model's weights from the Hugging Face cache or hub")
    pretrained_file: Optional[str] = key(None, "timm: local weights (.pth/.safetensors)")
    pretrained_dir: Optional[str] = key(None, "transformers: a save_pretrained folder")
    attn_implementation: Optional[Attention] = key(None, "transformers: eager or sdpa (null: sdpa)")
    architecture: Optional[Dict[str, Any]] = key(
        None, "transformers: the config values to build from with model.pretrained=false"
    )
    drop_path: float = key(
        0.0,
        "timm only: stochastic depth (drop_path_rate); a transformers model refuses it (model.kwargs.drop_path_rate)",
        at_least(0),
    )
    kwargs: Dict[str, Any] = key(
        {}, "any extra timm.create_model (or transformers config) argument: model.kwargs.depth=6"
    )


@dataclass
class TomeConfig:
    r: Any = key(8, "how much to merge per block (see Choosing r)", _r, "an int, [r, inflection] or a list of ints")
    flops: Optional[float] = key(
        None,
        "choose r from a FLOP budget: a fraction of the unmerged GFLOPs; tome.r must then be null (a tome.flops on the "
        "command line sets it; a tome.r sets tome.flops=null)",
        fraction,
    )
    prop_attn: bool = key(True, "proportional attention")
    protect: Protect = key(Protect.apart, "apart, prefix or class")
    class_layer: int = key(0, "block at which the class (and distillation) token enters", at_least(0))
    register_layer: int = key(0, "block at which the registers enter", at_least(0))


@dataclass
class RuntimeConfig:
    device: Device = key(Device.auto, "auto (CUDA if present, else the CPU), cuda or cpu")
    amp: Amp = key(Amp.auto, "auto (bf16 on CUDA, fp16 where bf16 is missing, fp32 on the CPU), bf16, fp16, off")
    num_workers: Optional[int] = key(None, "loader workers; null: the cores it may use, at most 4", at_least(0))
    threads: Optional[int] = key(None, "torch CPU threads; null: the cores this process may use", at_least(1))
    eval_batch_size: int = key(
        "${trainer.batch_size}", "batch of every evaluation (eval, validation during training)", at_least(1)
    )
    compile: Any = key(False, "torch.compile in train, eval and benchmark", _compile, "false, true or a mode")


@dataclass
class TrainerConfig:
    epochs: int = key(100, "epochs of the run", at_least(1))
    batch_size: int = key(64, "per process: the global batch is batch_size x world size x accum_steps", at_least(1))
    lr: float = key(
        5.0e-4,
        "for the global batch, used as given (timm's cosine schedule with warmup, stepped per update)",
        above(0),
    )
    min_lr: float = key(1.0e-6, "the schedule's floor", at_least(0))
    warmup_epochs: int = key(5, "warmup length", at_least(0))
    warmup_lr: float = key(1.0e-6, "warmup's first learning rate", at_least(0))
    weight_decay: float = key(0.05, "timm's create_optimizer_v2", at_least(0))
    optimizer: str = key("adamw", "any timm optimizer name (adamw, sgd, ...)")
    label_smoothing: float = key(0.1, "label smoothing", at_least(0))
    mixup: float = key(0.0, "mixup alpha (0: off)", at_least(0))
    cutmix: float = key(0.0, "cutmix alpha (0: off)", at_least(0))
    ema: bool = key(False, "timm's ModelEmaV3; validated and saved when on")
    ema_decay: float = key(0.9998, "EMA decay", fraction)
    clip_grad: Optional[float] = key(None, "max gradient norm", above(0))
    accum_steps: int = key(1, "gradient accumulation", at_least(1))
    augment: bool = key(True, "crop + flip (+ RandAugment on ImageNet-sized inputs)")
    eval_every: int = key(1, "epochs between validations", at_least(1))
    log_every: int = key(20, "updates between TensorBoard scalars", at_least(1))
    max_steps_per_epoch: Optional[int] = key(None, "smoke runs: training batches per epoch", at_least(1))
    max_val_steps: Optional[int] = key(
        None,
        "smoke runs: validation batches per evaluation, a fixed seeded subset drawn across the whole validation set",
        at_least(1),
    )
    stop_after_epochs: Optional[int] = key(None, "train at most this many epochs per invocation", at_least(1))
    init_from: Optional[str] = key(None, "start from the weights of a RegToMe checkpoint (same architecture)")
    resume: bool = key(
        False, "continue the run in hydra.run.dir from its last.pt (a finished run says so and changes nothing)"
    )
    overwrite: bool = key(False, "train a new run into a folder that holds one (the old run moves to previous/)")


@dataclass
class BenchmarkConfig:
    quick: Any = key(
        "auto",
        "on a CPU (auto) or always (true): keys not given take CPU-sized values (r [0,16], batch sizes [1,8], 3 "
        "repeats of 2 calls after 1 warm-up, no dense rows)",
        lambda v: None if v == "auto" or isinstance(v, bool) else "auto, true or false",
        "auto, true or false",
    )
    r: Any = key(
        [0, 8, 13, 16, [16, -1.0]], "schedules to compare with the unpatched model", _r_list, "a list of r values"
    )
    batch_sizes: List[int] = key(
        [1, 8, 64],
        "batch sizes to time",
        lambda v: None if v and all(isinstance(b, int) and b >= 1 for b in v) else "ints >= 1",
    )
    repeats: int = key(5, "rounds", at_least(1))
    iters: int = key(3, "calls per case and round", at_least(1))
    warmup: int = key(2, "warm-up calls", at_least(0))
    train_step: bool = key(True, "also time forward + backward + optimizer step")
    dense: bool = key(True, "also time dense features on the full grid")
    loader: bool = key(True, "also time the training data pipeline per worker")
    protect: Any = key(
        None,
        "time each r under each of these modes (null: tome.protect only)",
        _modes,
        "a mode, a list of modes or null",
    )
    target_speedup: Optional[float] = key(None, "find the least merging that reaches this inference speedup", above(1))


@dataclass
class VisualizeConfig:
    blocks: Optional[List[int]] = key(
        None,
        "blocks after which to draw the merged tokens: Python indices (-1: the last; one the model lacks is refused "
        "with the valid range; null: a third, two thirds and all of the blocks)",
    )
    attn_block: int = key(-1, "block whose class/register attention is drawn (-1: the last)")
    num_samples: int = key(4, "images to draw", at_least(1))
    compare_protect: bool = key(True, "draw every protection mode side by side")
    dense_features: bool = key(True, "also draw the last block's patch features (PCA to RGB)")


@dataclass
class ExportConfig:
    format: ExportFormat = key(ExportFormat.onnx, "onnx or torch_export")
    batch: Any = key("dynamic", "the exported batch size", _export_batch, "dynamic or an int >= 1")
    dtype: ExportDtype = key(ExportDtype.fp32, "fp32 or fp16")
    opset: int = key(18, "ONNX opset", at_least(7))
    samples: int = key(256, "images of the parity check", at_least(1))
    min_agreement: float = key(0.995, "top-1 agreement with PyTorch below this refuses the export", at_least(0))
    benchmark: bool = key(False, "also time the merged export against the unmerged one in onnxruntime")
    batch_size: int = key(8, "batch of that timing", at_least(1))
    repeats: int = key(9, "rounds of that timing", at_least(1))


@dataclass
class Config:
    task: Task = key(Task.train, "train, eval, benchmark, visualize, export")
    seed: int = key(0, "the run's seed (each rank draws with seed + rank after the model is built)")
    ckpt: Optional[str] = key(None, "eval, visualize, export: a RegToMe checkpoint")
    images: Optional[str] = key(None, "visualize, export: an image or a folder of images")
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tome: TomeConfig = field(default_factory=TomeConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    visualize: VisualizeConfig = field(default_factory=VisualizeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# Every key by its dotted name (the groups too: `trainer`, `trainer.lr`), and each group's dataclass.
FIELDS: dict[str, Field] = {f.name: f for f in fields(Config)}
GROUPS: dict[str, Any] = {name: f.default_factory for name, f in FIELDS.items() if is_dataclass(f.default_factory)}
FIELDS |= {f"{group}.{f.name}": f for group, schema in GROUPS.items() for f in fields(schema)}
schema_field = FIELDS.get  # the field of a key such as `trainer.lr`; None for a key the schema does not know
KEYS = [dotted for dotted in FIELDS if dotted not in GROUPS]  # every key in the schema's order, without the groups


def register() -> None:
    """Put the schema in Hydra's ConfigStore: `schema`, and a `default` option of each group whose keys all have a
    default here (`tome: default`, ...; dataset and model are chosen by their presets)."""
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    for name, schema in GROUPS.items():
        if MISSING not in (f.default for f in fields(schema)):
            store.store(group=name, name="default", node=schema)


def check_value(dotted: str, value: Any) -> Optional[str]:
    """The one line for a value `dotted` cannot take (its type, its closed set of words, its range), or None."""
    if dotted not in FIELDS or (isinstance(value, str) and "${" in value):
        return None  # model.kwargs.*, hydra.*: Hydra and the code judge it; an interpolation: `validate`, resolved
    group, _, leaf = dotted.rpartition(".")
    typed = OmegaConf.structured(GROUPS[group] if group else Config)
    try:
        OmegaConf.update(typed, leaf, value, merge=True)
    except Exception as err:  # OmegaConf's ValidationError: the type or the words
        return f"{dotted}={_shown(value)}: {takes(dotted) or first_line(err, None)}"
    return _check(dotted, OmegaConf.to_container(typed)[leaf], shown=value)  # type: ignore[index]


def _check(dotted: str, value: Any, shown: Any) -> Optional[str]:
    """The line for a well-typed value that fails its key's own check (a range, r's rule), or None."""
    found = FIELDS[dotted]
    check = found.metadata.get("check")
    problem = check(value) if check is not None else None
    if problem and "int" in str(found.type):
        problem = problem.replace("a number", "an int", 1)  # 'a number >= 1' is 'an int >= 1' for an int key
    return f"{dotted}={_shown(shown)}: takes {problem}" if problem else None


def takes(dotted: str) -> Optional[str]:
    """What a key takes, in words, from its type: 'takes a float', 'takes one of apart, prefix, class'."""
    found = FIELDS[dotted]
    if found.metadata.get("kind"):
        return f"takes {found.metadata['kind']}"
    kind = str(found.type)  # as written: `from __future__ import annotations`
    optional = kind.startswith("Optional[")
    kind = kind.removeprefix("Optional[").removesuffix("]") if optional else kind
    words = {"int": "an int", "float": "a number", "bool": "true or false", "str": "a string"}
    enum_type = globals().get(kind)
    if isinstance(enum_type, type) and issubclass(enum_type, enum.Enum):
        said = f"one of {', '.join(member.name for member in enum_type)}"
    elif kind in words:
        said = words[kind]
    elif kind.startswith("List["):
        said = f"a list of {kind[5:-1].replace('int', 'ints').replace('float', 'numbers')}"
    elif kind.startswith("Dict["):
        said = "a mapping"
    else:
        return None
    return f"takes {said}{' or null' if optional else ''}"


def validate(cfg: DictConfig) -> None:
    """Every rule a type cannot say (each key's own check, then the rules between keys), as one UserError line;
    run before any work: before a folder is made, for every job of a sweep."""
    try:  # resolved, Hydra's own node left out
        keys = [k for k in cfg if k != "hydra"]
        values = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True, enum_to_str=True)
    except OmegaConfBaseException as err:  # an interpolation that names no key, or gives a value of another type
        raise UserError(f"cannot resolve the config: {first_line(err, None)}") from None
    for dotted in KEYS:
        group, _, leaf = dotted.rpartition(".")
        value = values[group][leaf] if group else values[leaf]  # type: ignore[index]
        if value != "???" and (problem := _check(dotted, value, shown=value)):  # '???': the task says so
            raise UserError(problem)
    merge_amount(cfg.tome)  # tome.r or tome.flops, never both
    synthetic_only = [k for k in ("train_size", "val_size", "noise") if cfg.dataset[k] is not None]
    if cfg.dataset.name != "synthetic" and synthetic_only:
        raise UserError(
            f"dataset.{synthetic_only[0]} is read by dataset=synthetic only (this is dataset={cfg.dataset.name}): "
            "drop it"
        )
    if cfg.task == "train" and cfg.ckpt:
        *others, last = [name for name, task in TASKS.items() if task.reads_ckpt]
        raise UserError(
            f"ckpt is what {', '.join(others)} and {last} read; to start training from a checkpoint's weights "
            "use trainer.init_from=PATH"
        )


def plain(cfg: DictConfig) -> DictConfig:
    """The composed config with its enum values as the words they are (what the tasks, checkpoints and records
    read), struct as Hydra gives it; interpolations stay as written."""
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True), flags={"struct": True})


def _shown(value: Any) -> str:
    """A value as the command line spells it: [apart,bogus], null, true (not ['apart', 'bogus'], None, True)."""
    if isinstance(value, (list, tuple, ListConfig)):
        return "[" + ",".join(_shown(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)
