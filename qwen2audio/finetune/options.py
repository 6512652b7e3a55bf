"""The options of a fine-tuning run, in one typed dataclass shared by `qwen2audio finetune` and `finetune()`.

Defaults a practitioner expects: LoRA of rank 8 (alpha 16, no dropout) on the decoder's attention and MLP, AdamW at
1e-4 (1e-5 for full fine-tuning), 3% of the steps of linear warm-up then cosine decay to zero, gradient clipping at
1.0, 3 epochs, one example per process and 8 accumulated micro-batches per step. `resolved()` fills the defaults
that depend on others; `describe()` is what the run prints at its start.
"""

import json
import math
from dataclasses import asdict, dataclass, fields, replace

from ..errors import InputError

PARTS = ("encoder", "projector", "decoder")
LORA_TARGETS = ("attention", "mlp", "encoder", "projector")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Options that may differ between a run and its --resume: where it writes and how often, not what it computes.
NOT_COMPARED_ON_RESUME = ("out", "resume", "save_every", "eval", "eval_every", "quiet", "merge", "device")


@dataclass(frozen=True)
class FinetuneOptions:
    model: str
    data: str
    out: str
    full: bool = False  # full fine-tuning (every parameter not frozen) instead of LoRA
    lora_rank: int = 8
    lora_alpha: float | None = None  # None: twice the rank
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("attention", "mlp")  # of LORA_TARGETS
    freeze: tuple[str, ...] = ()  # of PARTS
    lr: float | None = None  # None: 1e-4 for LoRA, 1e-5 for full fine-tuning
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # None: 3% of the steps
    epochs: int = 3
    max_steps: int | None = None  # stops earlier than the epochs when given
    batch_size: int = 1  # examples per process per micro-batch
    grad_accum: int = 8
    max_grad_norm: float = 1.0  # 0 turns clipping off
    max_audio_seconds: float = 30.0
    gradient_checkpointing: bool = False
    dtype: str = "auto"  # auto: the checkpoint's for LoRA (adapters are fp32), float32 for full fine-tuning
    device: str = "auto"
    seed: int = 0
    save_every: int = 0  # steps between checkpoints; 0: none
    resume: str | None = None
    eval: str | None = None
    eval_every: int = 0  # 0: at the end only
    merge: bool = False
    skip_bad: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        object.__setattr__(self, "freeze", tuple(self.freeze))
        self._check_numbers()
        self._check_choices()

    def _check_numbers(self) -> None:
        positive = {"lora_rank": self.lora_rank, "epochs": self.epochs, "batch_size": self.batch_size,
                    "grad_accum": self.grad_accum}
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{_flag(name)} must be an integer >= 1, got {value!r}")
        for name in ("max_steps",):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "eval_every", "seed"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise InputError(f"{_flag(name)} must be an integer >= 0, got {value!r}")
        for name in ("lr", "lora_alpha"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InputError(f"{_flag(name)} must be a number > 0, got {value}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0 and self.max_grad_norm >= 0):
            raise InputError("--weight-decay and --max-grad-norm must be numbers >= 0")
        if not 0 <= self.lora_dropout < 1:
            raise InputError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 < self.max_audio_seconds <= 30:
            raise InputError(f"--max-audio-seconds must be in (0, 30] (the encoder hears 30 s at most), got "
                             f"{self.max_audio_seconds}")

    def _check_choices(self) -> None:
        for name, allowed in (("freeze", PARTS), ("lora_targets", LORA_TARGETS)):
            if bad := [v for v in getattr(self, name) if v not in allowed]:
                raise InputError(f"{_flag(name)} {bad[0]!r}: choose from {', '.join(allowed)}")
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype {self.dtype!r}: choose from {', '.join(DTYPES)}")
        if self.full and self.merge:
            raise InputError("--merge folds a LoRA adapter into the weights; --full already writes the whole model "
                             "(OUT/model), so drop --merge")
        if set(PARTS) <= set(self.freeze):
            raise InputError("--freeze encoder projector decoder leaves nothing to train")
        if not self.full and not self.lora_parts():
            raise InputError(f"LoRA on {', '.join(self.lora_targets) or 'nothing'} with --freeze "
                             f"{' '.join(self.freeze)} trains nothing: change --lora-targets or --freeze")

    def lora_parts(self) -> dict[str, bool]:
        """lora_targets() arguments: the chosen targets less the frozen parts."""
        frozen = set(self.freeze)
        chosen = {t: t in self.lora_targets for t in LORA_TARGETS}
        chosen["attention"] &= "decoder" not in frozen
        chosen["mlp"] &= "decoder" not in frozen
        chosen["encoder"] &= "encoder" not in frozen
        chosen["projector"] &= "projector" not in frozen
        return {k: v for k, v in chosen.items() if v}

    def resolved(self, total_steps: int) -> "FinetuneOptions":
        """The options with the defaults that depend on others filled in."""
        return replace(self, lr=self.lr or (1e-5 if self.full else 1e-4),
                       lora_alpha=self.lora_alpha or 2.0 * self.lora_rank,
                       warmup_steps=self.warmup_steps if self.warmup_steps is not None else
                       int(0.03 * total_steps),
                       dtype=self.dtype if self.dtype != "auto" or not self.full else "float32")

    def compared(self) -> dict:
        """The options a --resume must share with the run it continues."""
        return {k: v for k, v in self.to_json().items() if k not in NOT_COMPARED_ON_RESUME}

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples as lists, as they read back

    def describe(self) -> str:
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            lines.append(f"  {_flag(f.name):<26} {' '.join(value) if isinstance(value, tuple) else value}")
        return "\n".join(lines)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
