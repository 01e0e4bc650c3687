"""One typed config for every run.

Nested dataclasses hold every default. A YAML file overrides them (``--config FILE``), then dotted
``key=value`` arguments override the YAML (``optim.lr=5e-4``, ``model.kwargs.patch_size=8``).
Unknown keys and wrong types fail with one line that names the key and the closest valid key.
Values are parsed as YAML scalars (never evaluated as code).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union

import yaml

from timmface.errors import ConfigError
from timmface.fileio import atomic_write

# --------------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    backbone: str = "vit_tiny_patch16_224"
    """Any timm model name (or a ``students`` face variant such as ``face_resnet18``)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``timm.create_model`` keywords, e.g. ``{patch_size: 8, img_size: 112}``."""
    embed_dim: int = 512
    pretrained: bool = False
    """Start from timm's ImageNet weights (needs them in the local cache: runs are offline-safe)."""
    channels_last: bool = False


@dataclass
class LossConfig:
    name: str = "cosface"
    """cosface | arcface | adaface."""
    s: float = 64.0
    m: float | None = None
    """Margin; ``None`` takes the loss's published default (CosFace 0.4, ArcFace 0.5, AdaFace 0.4)."""
    h: float = 0.333
    """AdaFace: how much the feature norm modulates the margin."""
    t_alpha: float = 0.01
    """AdaFace: momentum of the running feature-norm mean/std."""
    straight_through: bool = False
    """ArcFace: reproduce arcface_torch's straight-through margin gradient instead of the analytic one."""


@dataclass
class HeadConfig:
    partial_fc: float = 0.0
    """Partial FC: 0 = all class centres every step; 0 < x < 1 = sample this fraction of the
    classes; x >= 2 = sample this many classes (a whole number, at least the micro-batch a head sees).
    The batch's own classes are always kept. Exactly 1 is refused: as a count it would be one class,
    while arcface_torch's ``sample_rate=1.0`` means all of them (here ``0``)."""
    sharded: bool = False
    """Split the class centres across DDP ranks (each holds C / world_size), as PartialFC_V2."""
    init_std: float = 0.01


@dataclass
class AugmentationConfig:
    name: str = ""
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    transforms: list[dict[str, Any]] = field(default_factory=list)
    """For ``RandomChoice`` / ``RandomApply`` / ``Compose``: the nested augmentations."""


@dataclass
class DemoConfig:
    enabled: bool = False
    """Generate (once, cached) and train on the built-in procedural demo faces."""
    num_identities: int = 250
    images_per_identity: int = 40
    num_val_identities: int = 200
    num_val_pairs: int = 2000
    difficulty: float = 1.0
    seed: int = 0
    cache_dir: str = ""
    """Where the demo data is written (in ``demo/``); empty = timmface's cache folder: ``$TIMMFACE_CACHE``, else
    ``$XDG_CACHE_HOME/timmface``, else ``~/.cache/timmface`` (:mod:`timmface.cache`)."""


@dataclass
class DataConfig:
    path: str = ""
    """A RecordIO folder (train.rec/.idx/property), an image folder, or ``wds://<shards>``."""
    format: str = "auto"
    """auto | recordio | folder | wds."""
    num_classes: int = 0
    """0 = read from ``property`` or the data."""
    num_workers: int = 4
    hflip: bool = True
    """Random horizontal flip (done on the device, after the batch arrives)."""
    augmentations: list[dict[str, Any]] = field(default_factory=list)
    """torchvision.transforms.v2 augmentations by name, e.g. ``{name: ColorJitter, args: [0.1, 0.1, 0.1, 0.1]}``."""
    val_sets: list[str] = field(default_factory=list)
    """``.bin`` verification files (or ``hf://OWNER/REPO[@REVISION]/FILE.bin`` of a dataset repository, recorded
    pinned to its commit); empty = every ``*.bin`` in ``path``."""
    image_size: int = 112
    """Training images are this size; others are resized (bilinear, antialiased) in the workers."""
    max_bad_fraction: float = 0.001
    """Stop when more than this fraction of the records read so far (at least 1,000 counted) failed
    to decode; 0 = stop at the first one."""
    prefetch_factor: int = 4
    decode: str = "cpu"
    """cpu | gpu | auto: where JPEGs are decoded. ``gpu`` (needs CUDA): workers only read and ship the bytes; a
    thread of the main process decodes each batch with one batched nvJPEG call, resizes on the GPU, and the
    augmentations run on the GPU per sample under the same seeds (pixels differ from CPU decoding by nvJPEG's
    chroma upsampling: a few levels on colourful fine detail, ~1 on faces); ``auto``: on CUDA, time both
    decoders over a few batches, keep the faster and say which (on a CPU: cpu). See
    ``timmface/data/gpu_decode.py``."""
    demo: DemoConfig = field(default_factory=DemoConfig)


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw | sgd | lamb."""
    lr: float = 1e-3
    weight_decay: float = 0.1
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup: float = 0.05
    """Warm-up length: a fraction of total_steps when < 1, else a number of steps."""
    final_lr_mult: float = 0.01
    """The cosine schedule ends at lr * final_lr_mult."""
    clip_grad_norm: float = 0.0
    """0 = no clipping."""
    grad_accum: int = 1
    """Micro-batches per optimiser step; batch_size stays the global batch per step."""
    resume_schedule: str = "continue"
    """A resumed run whose total_steps differs from its checkpoint's: ``continue`` = the rest of the
    learning-rate schedule is stretched (or squeezed) to end at the new total_steps, from the rate the run
    has now (no jump; a finished run extended stays at the final rate); ``recompute`` = the schedule of a
    run that always had the new total_steps (the rate jumps to that schedule's value)."""


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.999
    warmup_steps: int = 100
    """The EMA copies the weights at this step, then starts averaging."""
    every: int = 10
    """Update the EMA every this many steps (the seed's schedule)."""


@dataclass
class DistillConfig:
    teacher: str = ""
    """A teacher checkpoint, run directory, timm hub folder or ONNX file (``--teacher``), or a Hub id
    ``hf-hub:OWNER/REPO[@REVISION][/FILE]`` (recorded pinned to its commit, :mod:`timmface.hub`)."""
    teacher_arch: str = ""
    """Override architecture auto-detection (e.g. ``iresnet100``)."""
    teacher_dtype: str = "bfloat16"
    teacher_compile: bool | str = "auto"
    """auto | true | false: ``torch.compile`` the online teacher. ``auto``: on CUDA (the frozen forward is a
    large share of a step there), not on a CPU (compiling costs about a minute and gains nothing)."""
    cache: str = ""
    """A teacher-embedding cache written by ``timmface embed``; empty = run the teacher online."""
    feature_weight: float = 1.0
    feature_loss: str = "cosine"
    """cosine (1 - cos) | mse, between L2-normalised embeddings."""
    allow_projection: bool = True
    """Learn a linear map student -> teacher dims when they differ (dropped at export)."""
    relation_weight: float = 0.0
    relation_loss: str = "mse"
    """mse | kl, over the rows of pairwise cosine similarities: in the batch (``s_i . s_j`` against
    ``t_i . t_j``), or against the teacher memory (``distill.memory_size``: ``s_i . m_j`` against ``t_i . m_j``)."""
    relation_temperature: float = 0.1
    relation_gather: bool = False
    """Under DDP, in-batch relations (and EKD) span the embeddings gathered from every rank."""
    memory_size: int = 0
    """A FIFO of the last K teacher embeddings and labels (every rank's, saved with the run) that the relation
    terms and EKD compare each student embedding with instead of the batch; 0 = off. At least batch_size."""
    ekd_weight: float = 0.0
    """Evaluation-oriented KD (Huang et al., CVPR 2022; TFace): a rank loss on all positive pairs and the
    student's hardest negatives at each model's own thresholds for FPR 1e-1..1e-6; 1.0 = TFace's weighting
    (0.02 x positives + 0.01 x negatives). Pairs are in-batch, or against the memory (which brings positives)."""
    ekd_temperature: float = 0.01
    """EKD's sigmoid temperature (TFace: 0.01)."""
    ekd_topk: int = 2000
    """EKD: how many of the student's most similar negative pairs count (TFace: 2000)."""
    logit_weight: float = 0.0
    """Logit KD: Hinton's KL between the teacher's and the student's softmax over the class centres (the ones
    Partial FC samples), on logits ``loss.s * cos`` without margin; the teacher's against its own class centres
    (per-identity mean embeddings, computed once into the run folder)."""
    logit_temperature: float = 4.0
    """Logit KD's temperature T (the loss is multiplied by T^2)."""
    centres: str = "off"
    """The margin head's class centres: off | init (start from the teacher's per-identity mean embeddings) |
    frozen (those, never trained) | ema (those, moved after each step by normalise(m w + (1 - m) mean teacher
    embedding of the class in the batch), m = centres_momentum; not AdaDistill) | adadistill (AdaDistill,
    ECCV 2024: before the logits, each sample's centre w <- a w + (1 - a) t, a = clamp(cos(s, t) clamp(cos(w, t),
    1e-6, 1), 1e-6, 1), samples of one class in batch order; the centres stay trainable)."""
    centres_init: str = "random"
    """Where distill.centres=adadistill starts: random (the head's N(0, head.init_std), the reference) | teacher
    (the teacher's per-identity means). init, frozen and ema always start from the teacher."""
    centres_momentum: float = 0.99
    """distill.centres=ema: the momentum m."""
    margin_weight: float = 1.0
    """Weight of the margin loss itself."""


@dataclass
class LogConfig:
    every: int = 50
    """Steps between metric lines."""
    wandb: bool = False
    wandb_project: str = "timmface"
    tensorboard: bool = False
    progress: str = "auto"
    """auto | rich | plain | off."""


@dataclass
class Config:
    output_dir: str = "runs/default"
    total_steps: int = 10_000
    batch_size: int = 256
    """Global batch per optimiser step (across all ranks and micro-steps)."""
    seed: int = 0
    eval_every: int = 1000
    """0 = evaluate only at the end."""
    save_every: int = 1000
    """0 = save only at the end."""
    keep_last: int = 3
    resume: str = ""
    """A checkpoint path, a run directory, or ``auto`` (latest in output_dir, else start fresh)."""
    overwrite: bool = False
    """Allow starting a fresh run in an output_dir that already holds checkpoints."""
    amp: str = "auto"
    """auto | bfloat16 | float16 | none. ``auto``: bf16 on CUDA (float16 on GPUs without native bf16);
    on a CPU bf16 only with bf16 matrix units (AMX-BF16, AVX512-BF16), else fp32 (see timmface/amp.py)."""
    compile: bool = False
    """torch.compile the student backbone (before DDP wraps it)."""
    compile_fullgraph: bool = True
    """With ``compile``: first try one graph (``fullgraph=True``); a model with graph breaks falls back
    to ``fullgraph=False`` with a one-line warning. ``false`` skips the attempt."""
    device: str = "auto"
    """auto (CUDA when present, else CPU) | cpu | cuda | cuda:N."""
    deterministic: bool = False
    eval_batch_size: int = 256
    eval_flip: bool = True
    """Accuracy-Flip (insightface): sum embeddings of the image and its mirror."""
    eval_amp: str = "none"
    """Autocast of the in-training evaluation: none (fp32, as ``timmface eval`` and insightface) | bfloat16 |
    float16. Independent of ``amp``, so a logged accuracy is what ``timmface eval`` gives its checkpoint."""
    nonfinite: str = "skip"
    """What to do with a non-finite loss: skip (the step, up to max_nonfinite) | stop."""
    max_nonfinite: int = 10
    dist_timeout: float = 1800.0
    """Seconds a rank waits for the others before giving up with a message."""
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    log: LogConfig = field(default_factory=LogConfig)


# keys whose value is a free-form mapping: sub-keys are not checked against the schema
FREE_FORM = {"model.kwargs"}

CHOICES: dict[str, tuple[str, ...]] = {
    "loss.name": ("cosface", "arcface", "adaface"),
    "optim.name": ("adamw", "sgd", "lamb"),
    "amp": ("auto", "bfloat16", "float16", "none"),
    "eval_amp": ("none", "bfloat16", "float16"),
    "optim.resume_schedule": ("continue", "recompute"),
    "data.format": ("auto", "recordio", "folder", "wds"),
    "data.decode": ("cpu", "gpu", "auto"),
    "distill.feature_loss": ("cosine", "mse"),
    "distill.relation_loss": ("mse", "kl"),
    "distill.centres": ("off", "init", "frozen", "ema", "adadistill"),
    "distill.centres_init": ("random", "teacher"),
    "distill.teacher_dtype": ("float32", "bfloat16", "float16"),
    "nonfinite": ("skip", "stop"),
    "log.progress": ("auto", "rich", "plain", "off"),
}

# --------------------------------------------------------------------------------------------------
# Loading and merging
# --------------------------------------------------------------------------------------------------


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. ``["output_dir", ..., "optim.lr", ...]``."""
    keys = []
    hints = _type_hints(cls)
    for f in fields(cls):
        key = prefix + f.name
        keys.append(key)
        if is_dataclass(hints[f.name]):
            keys.extend(valid_keys(hints[f.name], key + "."))
    return keys


def _unknown_key(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    if not close:  # match on the last component (``lr`` -> ``optim.lr``)
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = [k for k in valid_keys() if k.rsplit(".", 1)[-1] == leaf]
        close = by_leaf[:1] or difflib.get_close_matches(leaf, valid_keys(), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{source}unknown config key '{key}'{hint}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only lossless, obvious cases."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, float) or (
            isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**1023
        ):
            return float(value)  # (an int past float's range raises OverflowError: it falls through to the error)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif is_dataclass(tp):
        if isinstance(value, dict):
            return value  # merged field by field by the caller
    shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
    hint = " (YAML reads a bare on/off/yes/no as a boolean: quote the word)" if isinstance(value, bool) else ""
    raise ConfigError(f"{source}config key '{key}' expects {_type_name(tp)}, got {shown}{hint}")


def _merge(obj: Any, updates: dict[str, Any], prefix: str, source: str) -> None:
    hints = _type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for name, value in updates.items():
        key = prefix + str(name)
        if name not in names:
            raise _unknown_key(key, source)
        tp = hints[name]
        if is_dataclass(tp) and not isinstance(tp, type(None)):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}config key '{key}' is a section; give it a mapping, got {value!r}")
            _merge(getattr(obj, name), value, key + ".", source)
            continue
        value = _coerce(value, tp, key, source)
        if key in FREE_FORM and isinstance(value, dict):
            value = {**getattr(obj, name), **value}  # merge, so YAML + overrides combine
        if key in CHOICES and value not in CHOICES[key]:
            close = difflib.get_close_matches(str(value), CHOICES[key], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}config key '{key}': '{value}' is not one of {', '.join(CHOICES[key])}{hint}")
        setattr(obj, name, value)


def _nest(key: str, value: Any) -> dict[str, Any]:
    """``"a.b.c", v`` -> ``{"a": {"b": {"c": v}}}``, respecting free-form keys."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in FREE_FORM and n < len(parts):
            value = _nest_plain(parts[n:], value)
            parts = parts[:n]
            break
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def _nest_plain(parts: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=5e-4"`` -> ``("optim.lr", "5e-4")`` with the value read as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"override {_short(repr(text))} is not of the form key=value")  # repr: one line
    key, raw = text.split("=", 1)
    key = key.strip().removeprefix("--")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError) as e:  # PyYAML recurses once per nesting level: "[[[[..." overflows
        raise ConfigError(f"override {_short(repr(text))}: value is not valid YAML ({e.__class__.__name__})") from None
    return key, value


def _is_text_field(key: str) -> bool:
    """Whether the schema types ``key`` as ``str`` (or ``str | None``): YAML's reading of a bare ``off``,
    ``yes`` or ``2024`` as a bool or a number is then not what the user meant."""
    tp: Any = Config
    for part in key.removeprefix("--").split("."):
        if not is_dataclass(tp):
            return False
        tp = _type_hints(tp).get(part)
        if tp is None:
            return False
    options = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    return str in options and all(o in (str, type(None)) for o in options)


def _short(text: str, limit: int = 80) -> str:
    """``text`` cut for an error line (an override or a path may be arbitrarily long)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():  # (False, not ValueError, for a path with a NUL byte)
        raise ConfigError(f"{_short(str(path))}: config file not found")
    try:
        # bytes, not text: PyYAML detects UTF-8/16 itself and reports bad bytes as a YAMLError, where
        # read_text() would raise UnicodeDecodeError (found by fuzzing)
        data = yaml.safe_load(path.read_bytes()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        # the first line of PyYAML's message says what was refused, e.g. a !!python/object tag
        problem = getattr(e, "problem", None) or str(e).strip().split("\n")[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {_short(str(problem), 160)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    except (OSError, ValueError) as e:  # a directory, no permission, a NUL byte or an over-long name (via 'base')
        raise ConfigError(f"{_short(str(path))}: cannot read the config file ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys, got {type(data).__name__}")
    return data


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file; a top-level ``base: other.yaml`` (relative to it) is read first."""
    try:
        path = path.resolve()
    except (OSError, ValueError, RuntimeError) as e:  # NUL byte, name too long, symlink loop (a 'base' is user text)
        raise ConfigError(f"{_short(str(path))}: cannot read the config file ({e.__class__.__name__})") from None
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    data = load_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file name")
    return _deep_update(_read_with_bases(path.parent / base, (*seen, path)), data)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides; validated against the schema."""
    cfg = Config()
    if path:
        _merge(cfg, _read_with_bases(Path(path)), "", f"{path}: ")
    for text in overrides:
        key, value = parse_override(text)
        if isinstance(value, (bool, int, float)) and _is_text_field(key):
            value = text.split("=", 1)[1].strip()  # log.progress=off, output_dir=2024: the text as typed
        _merge(cfg, _nest(key, value), "", "")
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any], source: str = "") -> Config:
    """Rebuild a :class:`Config` from ``asdict`` output (e.g. the copy inside a checkpoint)."""
    cfg = Config()
    _merge(cfg, data, "", source)
    return cfg


_PARTIAL_FC_ONE = (
    "head.partial_fc=1 is read as a count: one class centre per step (just the batch's own classes); "
    "for all classes, as arcface_torch's sample_rate=1.0, give head.partial_fc=0"
)


def validate(cfg: Config) -> None:
    """Cross-field checks that the type system cannot express."""
    if cfg.optim.grad_accum < 1:  # before the list: its divisibility check would divide by zero (found by fuzzing)
        raise ConfigError("optim.grad_accum must be >= 1")
    checks = [
        (cfg.total_steps > 0, "total_steps must be > 0"),
        (cfg.batch_size > 0, "batch_size must be > 0"),
        (cfg.batch_size % cfg.optim.grad_accum == 0, "batch_size must be divisible by optim.grad_accum"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.warmup >= 0, "optim.warmup must be >= 0"),
        (cfg.head.partial_fc >= 0, "head.partial_fc must be >= 0"),
        (cfg.head.partial_fc != 1, _PARTIAL_FC_ONE),
        (
            cfg.head.partial_fc < 1 or float(cfg.head.partial_fc).is_integer(),
            f"head.partial_fc={cfg.head.partial_fc:g}: a count of class centres must be a whole number "
            "(or give a fraction below 1)",
        ),
        (0 <= cfg.ema.decay < 1, "ema.decay must be in [0, 1)"),
        (cfg.ema.every >= 1, "ema.every must be >= 1"),
        (cfg.keep_last >= 1, "keep_last must be >= 1"),
        (cfg.eval_every >= 0 and cfg.save_every >= 0, "eval_every and save_every must be >= 0"),
        (bool(cfg.model.backbone), "model.backbone must name a timm model"),
        (0 <= cfg.data.max_bad_fraction <= 1, "data.max_bad_fraction must be in [0, 1]"),
        (
            cfg.distill.teacher_compile in (True, False, "auto"),
            f"config key 'distill.teacher_compile': '{cfg.distill.teacher_compile}' is not one of auto, true, false",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _validate_distill(cfg)


def _validate_distill(cfg: Config) -> None:
    """Distillation settings that contradict each other (those needing the teacher's size: the trainer)."""
    dc = cfg.distill
    weights = ("feature_weight", "relation_weight", "ekd_weight", "logit_weight", "margin_weight")
    negative = next((w for w in weights if getattr(dc, w) < 0), None)
    relation = dc.relation_weight > 0 or dc.ekd_weight > 0
    checks = [
        (negative is None, f"distill.{negative} must be >= 0"),
        (dc.memory_size >= 0, "distill.memory_size must be >= 0 (0 = no teacher memory)"),
        (
            dc.memory_size == 0 or relation,
            "distill.memory_size feeds the relation terms: set distill.relation_weight or distill.ekd_weight, or "
            "distill.memory_size=0",
        ),
        (
            dc.memory_size == 0 or dc.memory_size >= cfg.batch_size,
            f"distill.memory_size={dc.memory_size} must hold at least one global batch (batch_size={cfg.batch_size})",
        ),
        (
            dc.memory_size == 0 or not dc.relation_gather,
            "distill.relation_gather has no effect with distill.memory_size: the memory already holds every rank's "
            "teacher embeddings; remove one",
        ),
        (
            dc.centres_init == "random" or dc.centres == "adadistill",
            f"distill.centres_init=teacher applies to distill.centres=adadistill (centres={dc.centres}: "
            "init, frozen and ema always start from the teacher)",
        ),
        (dc.relation_temperature > 0, "distill.relation_temperature must be > 0"),
        (dc.logit_temperature > 0, "distill.logit_temperature must be > 0"),
        (dc.ekd_temperature > 0, "distill.ekd_temperature must be > 0"),
        (dc.ekd_topk >= 1, "distill.ekd_topk must be >= 1"),
        (0 <= dc.centres_momentum < 1, "distill.centres_momentum must be in [0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def to_dict(cfg: Config) -> dict[str, Any]:
    return asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, hidden=True) as f:
        f.write(yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())


def diff_configs(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two ``asdict`` configs."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict) and prefix + key not in FREE_FORM:
            out.extend(diff_configs(va, vb, prefix + key + "."))
        elif va != vb:
            out.append(prefix + key)
    return out


def replace(cfg: Config, **changes: Any) -> Config:
    return dataclasses.replace(cfg, **changes)
