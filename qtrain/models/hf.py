"""Hugging Face transformers causal language models as qtrain text models (the model `hf`).

`HFCausalLM` wraps a transformers causal LM (Llama, GPT-2, Qwen2, Mistral, ... any model
type `AutoModelForCausalLM` builds) so that it is what qtrain's trainer, evaluation and
sampling expect of a text model: forward(idx [B, T] int64) → next-token logits [B, T, V],
``generate`` as `qtrain.models.gpt.GPT.generate`, and a ``config`` with the options its
checkpoint record holds. The transformers model is its attribute ``model``, so the wrapper's
state dict keys are ``model.<transformers key>``.

    hf_path (a folder: config.json, optionally model.safetensors / pytorch_model.bin and a
             tokenizer) ──read_hf_folder──► HFFolder(config dict, weights present, tokenizer)
    config dict ──AutoModelForCausalLM.from_config──► HFCausalLM   (random initialisation)
    folder with weights ──from_pretrained──► HFCausalLM            (`hf_model_from_folder`)

A run's checkpoint stores the folder's config as a dict (options ``hf_config`` and
``block_size``, the training window), so a checkpoint, a packed file, evaluation and sampling
rebuild the model with transformers alone, never from the folder. Attention is always
transformers' "sdpa" implementation (`ATTENTION`), so the numbers do not depend on which
optional kernels are installed, and the weights are float32 whatever dtype the folder stores
(qtrain's ``amp`` chooses the arithmetic). ``use_cache`` is off: every forward reads its
whole window.

GPT-2 (and other models built from transformers' `Conv1D`, y = x·W + b with W stored
[in, out]) is converted at build: each Conv1D becomes an nn.Linear with weight Wᵀ [out, in]
and the same bias, computing the same y. So every family's block projections are nn.Linear,
and the quantization policies, per-output-row scales and activation quantization treat them
alike. `hf_state_dict` gives the weights back in transformers' own layout (Conv1D weights
transposed back, no ``model.`` prefix) and `load_hf_state_dict` takes that layout.

Quantization: the wrapper declares the output head (``get_output_embeddings()``, with the
token embedding when the two are tied) in ``full_precision_modules``, so the policy
`linear` quantizes exactly the block projections (attention q/k/v/o, MLP gate/up/down;
GPT-2's c_attn, c_proj, c_fc) and keeps embeddings, norms and the head in float.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from qtrain.base.errors import UserError
from qtrain.base.optional import require

from .gpt import check_token_ids, generate_tokens
from .registry import register_model

ATTENTION = "sdpa"  # transformers' attention implementation, named so results never depend on
# which kernels happen to be installed
DEFAULT_WINDOW = 256  # the training window (block_size) unless the model's context is shorter
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model", "vocab.txt")  # fmt: skip
# what config.json says about who wrote it, not about the model
WRITER_KEYS = ("transformers_version",)
EXTRA = "hf"


def transformers_module():
    """The transformers package, or a one-line MissingDependencyError naming the extra."""
    return require("transformers", EXTRA, "model hf (a Hugging Face causal LM)")


# -- the folder --------------------------------------------------------------------------------
@dataclass(frozen=True)
class HFFolder:
    """What a Hugging Face model folder holds: ``config`` (config.json as a dict, without the
    keys that only name the writing version), ``weights`` (whether weight files are present)
    and ``tokenizer`` (its transformers tokenizer, loaded on first use; None without one)."""

    path: Path
    config: dict
    weights: bool
    has_tokenizer: bool = field(default=False, repr=False)

    @cached_property
    def tokenizer(self):
        """``AutoTokenizer.from_pretrained(path, local_files_only=True)``, or None."""
        if not self.has_tokenizer:
            return None
        transformers = transformers_module()
        try:
            return transformers.AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
            reason = " ".join(str(e).split())[:160]
            raise UserError(
                f"the tokenizer in {self.path} cannot be loaded ({reason}); save it again "
                "with tokenizer.save_pretrained, or remove its files to train on characters"
            ) from None


def read_hf_folder(path: str | Path) -> HFFolder:
    """The `HFFolder` at `path`: a one-line UserError when it is missing, not a folder, has no
    config.json, a config.json that is not a JSON object, or a model that is not a causal
    language model (`check_causal_lm`)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UserError(
            f"hf_path {folder} does not exist; pass the folder of a Hugging Face causal "
            "language model (its config.json, weights and tokenizer)"
        )
    if not folder.is_dir():
        raise UserError(
            f"hf_path {folder} is a file, not a folder; pass the folder that holds its "
            "config.json (as save_pretrained writes it)"
        )
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"{folder} has no config.json, so it is not a Hugging Face model folder; pass the "
            "folder save_pretrained wrote"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"{config_file} is not valid JSON ({' '.join(str(e).split())[:120]}); restore it "
            "or save the model again with save_pretrained"
        ) from None
    if not isinstance(config, dict):
        raise UserError(
            f"{config_file} holds a JSON {type(config).__name__}, not an object; restore it or "
            "save the model again with save_pretrained"
        )
    config = {key: value for key, value in config.items() if key not in WRITER_KEYS}
    check_causal_lm(config, str(config_file))
    return HFFolder(
        folder,
        config,
        weights=any((folder / name).is_file() for name in WEIGHT_FILES),
        has_tokenizer=any((folder / name).is_file() for name in TOKENIZER_FILES),
    )


def check_causal_lm(config: dict, where: str = "the config") -> None:
    """Refuse a config dict that transformers cannot build as a causal language model.

    A causal LM is a model type `AutoModelForCausalLM` builds; an encoder family that
    transformers can also run as a decoder (BERT, RoBERTa, ...) counts only when its config
    says ``is_decoder``.
    """
    transformers = transformers_module()
    from transformers.models.auto import modeling_auto

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UserError(
            f"{where} has no model_type, so transformers cannot tell which model it describes; "
            "save the model again with save_pretrained"
        )
    if model_type not in transformers.CONFIG_MAPPING:
        raise UserError(
            f"{where} names model_type {model_type!r}, which transformers "
            f"{transformers.__version__} does not know; upgrade transformers or check the file"
        )
    causal = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    encoder = model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if model_type not in causal or (encoder and not config.get("is_decoder")):
        raise UserError(
            f"{where} describes a {model_type!r} model, which is not a causal language model; "
            "hf_path needs a causal LM (a decoder such as llama, gpt2 or qwen2)"
        )


def hf_config_object(config: dict):
    """The transformers config (a PretrainedConfig) of a causal LM's config dict."""
    transformers = transformers_module()
    check_causal_lm(config)
    values = {key: value for key, value in config.items() if key != "model_type"}
    try:
        return transformers.AutoConfig.for_model(config["model_type"], **values)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        reason = " ".join(str(e).split())[:160]
        raise UserError(
            f"transformers cannot read the {config['model_type']!r} config ({reason}); save "
            "the model again with save_pretrained"
        ) from None


def vocab_size_of(config: dict) -> int:
    """The number of token ids the model embeds (its config's vocab_size)."""
    hf = hf_config_object(config)
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf  # nested text configs
    return int(text.vocab_size)


def context_of(config: dict) -> int | None:
    """The most positions the model reads (max_position_embeddings, GPT-2's n_positions);
    None when its config sets no limit."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def default_window(config: dict) -> int:
    """The training window when block_size is unset: min(`DEFAULT_WINDOW`, the context)."""
    context = context_of(config)
    return DEFAULT_WINDOW if context is None else min(DEFAULT_WINDOW, context)


# -- GPT-2's Conv1D ----------------------------------------------------------------------------
def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' Conv1D (y = x·W + b, W stored [in, out]), told by its class and
    module names so that no transformers import is needed."""
    kind = type(module)
    return kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers")


@torch.no_grad()
def conv1d_to_linear_(model: nn.Module) -> tuple[str, ...]:
    """Replace every transformers Conv1D of `model` by the equivalent nn.Linear (weight
    transposed to [out, in], same bias, same dtype and device), in place; returns the names
    of the replaced modules (as in ``model.named_modules()``)."""
    names = tuple(name for name, module in model.named_modules() if is_conv1d(module))
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        conv = getattr(parent, child)
        n_in, n_out = conv.weight.shape
        linear = nn.Linear(n_in, n_out, bias=conv.bias is not None, device="meta")
        linear.weight = nn.Parameter(conv.weight.t().contiguous(),
                                     requires_grad=conv.weight.requires_grad)  # fmt: skip
        if conv.bias is not None:
            linear.bias = conv.bias
        setattr(parent, child, linear)
    return names


# -- the wrapper -------------------------------------------------------------------------------
@dataclass(frozen=True)
class HFOptions:
    """What a checkpoint records of an `HFCausalLM` (the model's `record_options`)."""

    hf_config: dict  # config.json as a dict
    block_size: int  # the training window in tokens (≤ the model's context)


class HFCausalLM(nn.Module):
    """A transformers causal LM as a qtrain text model (see the module doc).

    Args:
        model: a transformers causal LM (a PreTrainedModel with ``get_output_embeddings``);
            its Conv1D layers are converted to nn.Linear in place.
        hf_config: the config dict it was built from (default: ``model.config.to_dict()``).
        block_size: the training window (default `default_window`).
        num_tokens: the token ids its text uses (characters or a tokenizer's ids); sampling
            draws only these. Default: the config's vocab_size.
    """

    def __init__(self, model: nn.Module, *, hf_config: dict | None = None,
                 block_size: int | None = None, num_tokens: int | None = None) -> None:  # fmt: skip
        super().__init__()
        if hf_config is None:
            hf_config = {k: v for k, v in model.config.to_dict().items() if k not in WRITER_KEYS}
        self.conv1d = conv1d_to_linear_(model)
        model.config.use_cache = False
        self.model = model
        self.context = context_of(hf_config)
        window = default_window(hf_config) if block_size is None else block_size
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise UserError(f"block_size must be a positive number of tokens, got {window!r}")
        if self.context is not None and window > self.context:
            raise UserError(
                f"block_size {window} is longer than the model's context ({self.context} "
                "positions in its config.json); lower {block_size}",
                block_size="block_size",
            )
        self.config = HFOptions(hf_config, window)
        vocab = model.get_output_embeddings().weight.shape[0]
        self.num_tokens = vocab if num_tokens is None else min(num_tokens, vocab)
        # kept in full precision by the `linear` policy (qtrain.methods.policy): the head, and
        # with it the token embedding when the two are one parameter
        self.full_precision_modules = (self._name_of(model.get_output_embeddings()),)

    def _name_of(self, module: nn.Module) -> str:
        return next(name for name, m in self.named_modules() if m is module)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] (int64, T ≤ the model's context) → next-token logits [B, T, V].

        On the meta device (qtrain's preflight builds models there to check shapes and sizes)
        the logits are an empty meta tensor of that shape: transformers' mask code reads the
        values of the positions, which meta tensors do not have.
        """
        check_token_ids(idx, "the hf model's")
        length = idx.shape[1]
        if self.context is not None and length > self.context:
            raise UserError(
                f"the sequence has {length} tokens but the model's context is {self.context}; "
                f"pass at most {self.context} tokens (crop to the last {self.context})"
            )
        if idx.device.type == "meta":
            head = self.model.get_output_embeddings().weight
            return torch.empty(*idx.shape, head.shape[0], dtype=head.dtype, device="meta")
        return self.model(input_ids=idx, use_cache=False).logits

    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, generator: torch.Generator,
                 temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:  # fmt: skip
        """Extend idx [B, T] by `max_new_tokens` sampled tokens → [B, T + max_new_tokens]
        (`qtrain.models.gpt.generate_tokens` over the model's context and its text's ids)."""
        return generate_tokens(self, idx, max_new_tokens, context=self.context,
                               generator=generator, temperature=temperature, top_k=top_k,
                               num_tokens=self.num_tokens)  # fmt: skip


def build_from_config(config: dict, **wrapper_options) -> HFCausalLM:
    """An `HFCausalLM` of the config dict, randomly initialised by transformers' own rule
    (from torch's default generator, on the current default device)."""
    transformers = transformers_module()
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config_object(config), attn_implementation=ATTENTION, **_float32(transformers)
    )
    return HFCausalLM(model, hf_config=config, **wrapper_options)


def hf_model_from_folder(path: str | Path, *, block_size: int | None = None,
                         num_tokens: int | None = None) -> HFCausalLM:  # fmt: skip
    """The `HFCausalLM` of a model folder: its weights when it has them
    (``from_pretrained``, float32), else a random initialisation from its config."""
    folder = read_hf_folder(path)
    options = dict(block_size=block_size, num_tokens=num_tokens)
    if not folder.weights:
        return build_from_config(folder.config, **options)
    transformers = transformers_module()
    try:
        with _no_progress_bar(transformers):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(folder.path),
                config=hf_config_object(folder.config),
                local_files_only=True,
                attn_implementation=ATTENTION,
                **_float32(transformers),  # a bf16 or fp16 file's values, exactly
            )
    except (OSError, ValueError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:160]
        raise UserError(
            f"the weights in {folder.path} cannot be loaded ({reason}); save the model again "
            "with save_pretrained"
        ) from None
    return HFCausalLM(model, hf_config=folder.config, **options)


def _float32(transformers) -> dict:
    """The keyword that makes transformers build in float32 whatever dtype the config names
    (``dtype`` from transformers 4.56, ``torch_dtype`` before)."""
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}


@contextlib.contextmanager
def _no_progress_bar(transformers):
    """transformers' progress bars off (loading a small model draws one per call), restored."""
    logging = transformers.utils.logging
    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()


# -- transformers' layout ----------------------------------------------------------------------
def hf_state_dict(wrapper: HFCausalLM) -> dict[str, torch.Tensor]:
    """The wrapper's weights in transformers' layout: keys without the ``model.`` prefix and
    every converted Conv1D weight transposed back to [in, out] (a new tensor); the others are
    the wrapper's own tensors (tied ones stay tied)."""
    transposed = {f"{name}.weight" for name in wrapper.conv1d}
    return {
        key: tensor.t().contiguous() if key in transposed else tensor
        for key, tensor in wrapper.model.state_dict().items()
    }


@torch.no_grad()
def load_hf_state_dict(wrapper: HFCausalLM, state: dict[str, torch.Tensor]) -> None:
    """Copy a state dict in transformers' layout (`hf_state_dict`'s) into the wrapper.

    Every key must be one of the model's; a key may be missing only when its tensor is tied
    to one that is given (save_pretrained stores a tied head once). A one-line UserError
    names the first key that does not fit.
    """
    transposed = {f"{name}.weight" for name in wrapper.conv1d}
    own = wrapper.model.state_dict()
    given = {key: value.t() if key in transposed else value for key, value in state.items()}
    unknown = sorted(set(given) - set(own))
    given_storages = {_storage(own[key]) for key in given if key in own}
    missing = sorted(
        key for key in set(own) - set(given) if _storage(own[key]) not in given_storages
    )
    problem = (f"it has {unknown[0]!r}, which the model does not" if unknown else
               f"it lacks {missing[0]!r}" if missing else None)  # fmt: skip
    if problem is None:
        for key, value in given.items():
            if value.shape != own[key].shape:
                problem = f"{key!r} is {list(value.shape)}, the model's {list(own[key].shape)}"
                break
    if problem:
        raise UserError(
            f"the weights do not fit the {wrapper.config.hf_config.get('model_type')!r} model "
            f"({problem}); load weights saved from a model of the same config"
        )
    for key, value in given.items():
        own[key].copy_(value)


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


# -- registration ------------------------------------------------------------------------------
HF_OPTIONS = ("hf_path", "block_size")


def _context(options: dict) -> int:
    """The default training window of the `hf` options (reads the folder's config.json)."""
    if options.get("hf_config") is not None:
        return default_window(options["hf_config"])
    return default_window(read_hf_folder(_required_path(options.get("hf_path"))).config)


def _required_path(path) -> str:
    if path is None:
        raise UserError(
            "model 'hf' needs {hf_path}, the folder of a Hugging Face causal language model "
            "(config.json, and its weights and tokenizer when it has them)",
            hf_path="hf_path=FOLDER",
        )
    return path


@register_model("hf", input_size=DEFAULT_WINDOW, dataset="shakespeare-char", modality="text",
                options=HF_OPTIONS, record_options=("hf_config", "block_size"),
                context=_context)  # fmt: skip
def build_hf(vocab_size: int, *, hf_path: str | None = None, hf_config: dict | None = None,
             block_size: int | None = None, pretrained: bool = False) -> HFCausalLM:  # fmt: skip
    """A Hugging Face transformers causal LM read from a folder (hf_path).

    `HFCausalLM` of the folder `hf_path` (its config; with `pretrained`, its weights when it
    has them) or of a stored config dict `hf_config` (a rebuild: random weights, to be
    overwritten by the checkpoint's); `vocab_size` is the number of token ids its text uses,
    `block_size` the training window.
    """
    transformers_module()
    options = dict(block_size=block_size, num_tokens=vocab_size)
    if hf_config is not None:
        if hf_path is not None:
            raise UserError("model 'hf' takes hf_path or hf_config, not both")
        if not isinstance(hf_config, dict):
            raise TypeError(f"hf_config must be a dict, got {type(hf_config).__name__}")
        return build_from_config(hf_config, **options)
    path = _required_path(hf_path)
    if pretrained:
        return hf_model_from_folder(path, **options)
    return build_from_config(read_hf_folder(path).config, **options)
