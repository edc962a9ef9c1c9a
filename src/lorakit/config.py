"""`LoraConfig`: what to adapt and how, validated on construction, convertible to/from PEFT's JSON.

The field names follow the LoRA paper (`r`, `alpha`); `to_peft_dict` / `from_peft_dict` translate to the
names Hugging Face PEFT writes in `adapter_config.json` (`lora_alpha`, `lora_dropout`, ...), so an adapter
folder is readable by both libraries.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

BIAS_MODES = ("none", "all", "lora_only")
WEIGHT_INITS = ("pissa", "olora")  # initialisations computed from the base weight (see layers/variants.py)
INIT_MODES = ("kaiming", "gaussian", *WEIGHT_INITS)
ALL_LINEAR = "all-linear"
# Where `lorakit train` (and `lorakit estimate`, which models its runs) differs from a LoraConfig built in code,
# which follows PEFT: rank 16 with alpha 32 scored higher than 8 with 16 on E2E validation and rank hardly moves
# SST-2 accuracy (docs/results.md); dropout 0.05 regularises training on small data sets.
TRAIN_LORA_DEFAULTS: dict[str, Any] = {"r": 16, "alpha": 32.0, "dropout": 0.05}

# PEFT fields that lorakit understands through its own names.
_PEFT_TO_LORAKIT = {
    "r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "target_modules",
    "exclude_modules": "exclude_modules",
    "layers_to_transform": "layers_to_transform",
    "layers_pattern": "layers_pattern",
    "rank_pattern": "rank_pattern",
    "alpha_pattern": "alpha_pattern",
    "bias": "bias",
    "modules_to_save": "modules_to_save",
    "fan_in_fan_out": "fan_in_fan_out",
    "use_rslora": "use_rslora",
    "use_dora": "use_dora",
    "task_type": "task_type",
    "base_model_name_or_path": "base_model_name_or_path",
}
# PEFT fields that carry no meaning for the weights of a plain LoRA adapter (bookkeeping, or options
# that PEFT writes with a neutral default). A non-neutral value of an option that changes the math is
# refused in `from_peft_dict`.
_PEFT_BOOKKEEPING = {
    "peft_type",
    "peft_version",
    "auto_mapping",
    "revision",
    "inference_mode",
    "init_lora_weights",
    "megatron_config",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "kasa_config",
    "lora_ga_config",
    "monteclora_config",
    "velora_config",
    "arrow_config",
    "qalora_group_size",
    "ensure_weight_tying",
    "alora_invocation_tokens",
    "use_bdlora",
}
_PEFT_UNSUPPORTED = {  # field -> its neutral value
    "lora_bias": False,
    "use_qalora": False,
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
}


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter.

    Args:
        r: rank of the update ΔW = (alpha / r) · B · A.
        alpha: scaling numerator; the update is multiplied by alpha / r (alpha / sqrt(r) with `use_rslora`).
        dropout: dropout probability on the input of the low-rank path, in [0, 1).
        target_modules: module names matched against the last component(s) of module paths
            (`["q_proj", "v_proj"]`, `["attn.c_attn"]`), a regex matched against the full path, or
            `"all-linear"` (every linear layer except the output head).
        exclude_modules: names or a regex of modules never to adapt, same matching as `target_modules`.
        layers_to_transform: adapt only modules inside these layer indices.
        layers_pattern: the name of the layer list (`"layers"`, `"h"`) used to find layer indices.
        rank_pattern / alpha_pattern: per-module overrides, `{name or regex: value}` matched on the path end.
        bias: which biases train: "none", "all" (every bias of the model) or "lora_only" (adapted layers).
        modules_to_save: modules trained in full beside the adapter (e.g. a new classifier head).
        init: "kaiming" (A uniform as in PEFT's default, B zero) or "gaussian" (A with std 1/r, B zero): the
            adapted model starts equal to the base. "pissa" (A, B from the top-r singular vectors of W0) or
            "olora" (from a QR decomposition of W0): the frozen residual is W0 − scaling·B0·A0, so the model
            also starts equal to the base (Linear and Conv1D layers only).
        fan_in_fan_out: True when the base weight is stored (in, out); None detects GPT-2's Conv1D.
        use_rslora: rank-stabilised scaling alpha / sqrt(r).
        use_dora: weight-decomposed LoRA: W' = m · (W0 + ΔW) / ‖W0 + ΔW‖ with the norm taken per output
            feature and a trainable magnitude m (Linear and Conv1D layers only).
        task_type / base_model_name_or_path: recorded in the adapter file for other tools.
    """

    r: int = field(
        default=8,
        metadata={
            "help": "LoRA rank (write --lora-rank under torchrun, whose own options swallow --r)",
            "flags": ("--r", "--lora-rank"),
        },
    )
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (update scaled by alpha/r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "comma-separated module names, or all-linear"}
    )
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init: str = field(
        default="kaiming",
        metadata={"help": "kaiming, gaussian, pissa (A, B from W0's top singular vectors) or olora (QR)"},
    )
    fan_in_fan_out: bool | None = None
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA: scale by alpha/sqrt(r) instead of alpha/r"})
    use_dora: bool = field(
        default=False, metadata={"help": "DoRA: weight-decomposed LoRA (a trained magnitude per output feature)"}
    )
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if self.target_modules == [ALL_LINEAR]:  # `--target-modules all-linear` arrives as a one-name list
            self.target_modules = ALL_LINEAR
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        self._validate()

    def _validate(self) -> None:
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {self.init!r}")
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.target_modules is None or (not isinstance(self.target_modules, str) and not self.target_modules):
            raise ValueError('target_modules is required, e.g. ["q_proj", "v_proj"] or "all-linear"')
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            _check_names(name, getattr(self, name))
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must map module names to values, got {getattr(self, name)!r}")
        if self.fan_in_fan_out not in (None, True, False):
            raise ValueError(f"fan_in_fan_out must be true, false or null, got {self.fan_in_fan_out!r}")
        for name in ("task_type", "base_model_name_or_path"):
            if not isinstance(getattr(self, name), (str, type(None))):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        for key, value in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", value)
            _check_regex("rank_pattern", key)
        for key, alpha in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{key!r}]", alpha)
            _check_regex("alpha_pattern", key)
        if self.layers_to_transform is not None and not (
            isinstance(self.layers_to_transform, list)
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers_to_transform)
        ):
            raise ValueError(f"layers_to_transform must be non-negative integers, got {self.layers_to_transform!r}")
        if self.modules_to_save is not None and not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise ValueError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")

    # -- per-module values ---------------------------------------------------------------------
    def rank_for(self, module_path: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_path, self.r))

    def alpha_for(self, module_path: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module_path, self.alpha))

    def scaling_for(self, module_path: str) -> float:
        r = self.rank_for(module_path)
        alpha = self.alpha_for(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # -- PEFT's adapter_config.json ------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        """The fields PEFT 0.x reads, with this adapter's values."""
        data = {peft_key: getattr(self, ours) for peft_key, ours in _PEFT_TO_LORAKIT.items()}
        data["fan_in_fan_out"] = bool(self.fan_in_fan_out)
        data["peft_type"] = "LORA"
        # PEFT's values: True (kaiming), "gaussian", "pissa", "olora". A pissa/olora adapter is applied by
        # redoing the decomposition of the original base weight (see lorakit.io.save_adapter, convert_to_lora).
        data["init_lora_weights"] = True if self.init == "kaiming" else self.init
        data["inference_mode"] = True
        data["lora_bias"] = False
        return data

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Read a PEFT `adapter_config.json`. Unknown fields (from a newer PEFT) are ignored with a warning;
        options that change the math and that lorakit does not implement are refused."""
        peft_type = data.get("peft_type", "LORA")
        peft_type = getattr(peft_type, "value", peft_type)  # PEFT's in-memory configs hold an enum
        if str(peft_type).upper() != "LORA":
            raise ValueError(f"adapter is of type {peft_type!r}; lorakit loads LoRA adapters only")
        for key, neutral in _PEFT_UNSUPPORTED.items():
            if data.get(key, neutral) not in (neutral, None, False, [], {}):
                raise ValueError(f"adapter uses PEFT option {key}={data[key]!r}, which lorakit does not support")
        kwargs = {ours: data[peft_key] for peft_key, ours in _PEFT_TO_LORAKIT.items() if peft_key in data}
        for flag in ("use_rslora", "use_dora"):
            if kwargs.get(flag) is None:
                kwargs.pop(flag, None)
        init = data.get("init_lora_weights")
        if isinstance(init, str) and init.lower() in ("gaussian", *WEIGHT_INITS):
            kwargs["init"] = init.lower()
        elif isinstance(init, str) and init.lower().startswith("pissa_niter"):
            # Its residual came from a randomised SVD that cannot be redone; PEFT can convert it to plain LoRA.
            raise ValueError(
                f"adapter uses init_lora_weights={init!r} (randomised SVD), which lorakit cannot reproduce; "
                "save it with PEFT's path_initial_model_for_weight_conversion to get a plain LoRA adapter"
            )
        for key in ("rank_pattern", "alpha_pattern"):
            kwargs[key] = kwargs.get(key) or {}
        unknown = sorted(set(data) - set(_PEFT_TO_LORAKIT) - _PEFT_BOOKKEEPING - set(_PEFT_UNSUPPORTED))
        if unknown:
            warnings.warn(f"ignoring unknown adapter config fields: {', '.join(unknown)}", stacklevel=2)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _check_regex(field_name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{field_name}: {pattern!r} is not a valid regular expression ({err})") from None


def _check_names(field_name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str):
        if value != ALL_LINEAR:
            _check_regex(field_name, value)
        return
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{field_name} must be a list of module names or a regex string, got {value!r}")


def _pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's rule: a pattern key applies when it matches the end of the module path at a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default
