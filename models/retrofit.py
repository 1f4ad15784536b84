"""Retrofit pretrained Hugging Face encoders: gate every FFN of a ``transformers`` model in place.

Supported families (the HF config's ``model_type``), with a classification head
(``<Family>ForSequenceClassification``, ViT's ``ViTForImageClassification``: output ``logits``)
or without (``<Family>Model``: output ``pooled``, the encoder's last hidden states averaged over
the valid steps; for ViT over every token, the CLS token's included):

- **Audio: Wav2Vec2, HuBERT, WavLM.** Raw audio, the server's default contract: FP32 ``input``
  [batch, samples] (or [batch, samples, 1]); each request's samples are its length, and the
  attention mask the encoder gets is built from the lengths. HF derives the frame-level mask
  after the convolutional front end, which is what the gated layers' predictors see too (their
  lengths follow the front end's convolutions). Front ends whose output depends on padding
  (``feat_extract_norm: group``, the base configs' group-norm feature extractor) make the
  network not padding invariant, so the server batches such a model only with requests of the
  same length.
- **Text: BERT, RoBERTa.** INT64 ``input_ids`` [batch, T] (each id inside the vocabulary),
  optional ``attention_mask`` [batch, T] (ones then zeros: a row's length) and optional
  ``token_type_ids``; the server pads ids with the model's pad token.
- **Image: ViT.** FP32 ``pixel_values`` [batch, num_channels, image_size, image_size], an input
  of fixed shape (no length, no mask, never padded: :mod:`models.contract`). Every request puts
  the same tokens through the encoder, (image_size / patch_size)² patches and the CLS token:
  that count is the model's ``max_length``, the resolution its gated layers run at, so their
  predictors pool over every token and the MAC count is that of the whole sequence.

The model comes from a local folder written by ``save_pretrained`` (``from_pretrained`` on a
path, never a download) or from a ``transformers`` config (random weights, for speed work).
Each encoder layer's FFN pair becomes a gated FFN (:func:`models.attach_gates`), with the gate
configuration of a model config file (the parameter guide's keys), and the result is an
ordinary checkpoint: ``config.yaml`` names the factory :func:`hf_encoder` with the
``transformers`` config as its arguments, so ``load_checkpoint``, ``gated evaluate`` and
``gated serve`` rebuild it without the source folder.

``transformers`` is an optional dependency: ``pip install 'gated-serve[hf]'``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from models.config import ModelConfig, load_config, parse_config
from models.contract import ModelContract, TensorSpec
from models.errors import ArchitectureError, ConfigError
from models.layers import current
from models.networks import GatedNetwork, _masked_mean, attach_gates


@dataclass(frozen=True)
class Family:
    """How one ``transformers`` family is built and where its FFNs are."""

    kind: str  # "audio" (raw samples in), "text" (token ids in) or "image" (pixels in)
    config: str  # the config class
    classifier: str  # the classification model class
    base: str  # the encoder model class (no head)
    attribute: str  # the encoder's attribute inside the classifier
    # (the encoder's layer list, from the encoder; the FFN pair, from one layer), in the order
    # tried: the first whose modules exist is used (releases of transformers differ).
    layouts: tuple[tuple[str, tuple[str, str]], ...]
    # Whether the encoder without a head keeps its pooler. ``pooled`` never reads it; BERT's
    # stays for the checkpoints that hold its weights, ViT's is left out (no compute spent).
    pooler: bool = True


_AUDIO = (("encoder.layers", ("feed_forward.intermediate_dense", "feed_forward.output_dense")),)
_BERT = (("encoder.layer", ("intermediate.dense", "output.dense")),)
# transformers 5 gives ViT its own layout; before, it was BERT's.
_VIT = (("layers", ("mlp.fc1", "mlp.fc2")), *_BERT)
FAMILIES: dict[str, Family] = {
    "wav2vec2": Family("audio", "Wav2Vec2Config", "Wav2Vec2ForSequenceClassification",
                       "Wav2Vec2Model", "wav2vec2", _AUDIO),
    "hubert": Family("audio", "HubertConfig", "HubertForSequenceClassification",
                     "HubertModel", "hubert", _AUDIO),
    "wavlm": Family("audio", "WavLMConfig", "WavLMForSequenceClassification",
                    "WavLMModel", "wavlm", _AUDIO),
    "bert": Family("text", "BertConfig", "BertForSequenceClassification",
                   "BertModel", "bert", _BERT),
    "roberta": Family("text", "RobertaConfig", "RobertaForSequenceClassification",
                      "RobertaModel", "roberta", _BERT),
    "vit": Family("image", "ViTConfig", "ViTForImageClassification", "ViTModel", "vit", _VIT,
                  pooler=False),
}
FACTORY = "models.retrofit:hf_encoder"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ArchitectureError(
            "retrofitting Hugging Face models needs transformers: pip install 'gated-serve[hf]'"
        ) from None
    return transformers


def _pair(value: Any) -> tuple[int, int]:
    """A ViT config's ``image_size`` / ``patch_size``: an int, or (height, width)."""
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


def image_geometry(config: Any) -> tuple[tuple[int, int, int], int]:
    """A ViT config's input (channels, height, width) and the tokens its encoder sees: one per
    patch, and the CLS token."""
    height, width = _pair(config.image_size)
    patch_h, patch_w = _pair(config.patch_size)
    tokens = (height // patch_h) * (width // patch_w) + 1
    return (int(config.num_channels), height, width), tokens


class HFEncoder(nn.Module):
    """A ``transformers`` encoder behind the server's contract: ``forward(x, lengths, **extras)
    -> logits (B, labels)`` (with a head) or ``pooled`` (B, hidden) (without one).

    Audio: ``x`` (B, samples, 1) FP32. Text: ``x`` (B, T) INT64 token ids, ``token_type_ids``
    among the extras. The attention mask is built from ``lengths`` (valid steps first). Image:
    ``x`` (B, C, H, W) FP32 pixels of the config's size; no mask (every token is valid, the
    lengths are all the token count).
    """

    def __init__(self, hf: nn.Module, family: str, head: bool) -> None:
        super().__init__()
        self.hf = hf
        self.family = family
        self.head = head
        spec = FAMILIES[family]
        config: Any = hf.config
        # Group norm over time sees the padding (docs/model-contract.md, "Lengths and padding").
        self.padding_invariant = getattr(config, "feat_extract_norm", "layer") != "group"
        width = int(config.num_labels) if head else int(config.hidden_size)
        output = TensorSpec("logits" if head else "pooled", "FP32", (-1, width))
        if spec.kind == "audio":
            self.gated_contract = ModelContract(
                inputs=(TensorSpec("input", "FP32", (-1, -1, 1), length_dim=1),),
                outputs=(output,),
            )
        elif spec.kind == "image":
            (channels, height, width), _ = image_geometry(config)
            self.gated_contract = ModelContract(
                inputs=(TensorSpec("pixel_values", "FP32", (-1, channels, height, width)),),
                outputs=(output,),
            )
        else:
            pad = int(getattr(config, "pad_token_id", 0) or 0)
            types = int(getattr(config, "type_vocab_size", 1))
            self.gated_contract = ModelContract(
                inputs=(
                    TensorSpec("input_ids", "INT64", (-1, -1), pad_value=pad, length_dim=1,
                               value_range=(0, int(config.vocab_size) - 1)),
                    TensorSpec("attention_mask", "INT64", (-1, -1), optional=True, length_dim=1,
                               role="mask"),
                    TensorSpec("token_type_ids", "INT64", (-1, -1), optional=True, length_dim=1,
                               value_range=(0, types - 1)),
                ),
                outputs=(output,),
            )

    @property
    def encoder(self) -> nn.Module:
        """The encoder model (inside the classifier, or the whole model without a head)."""
        return getattr(self.hf, FAMILIES[self.family].attribute) if self.head else self.hf

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if FAMILIES[self.family].kind == "image":
            return self._image(x)
        steps = torch.arange(x.shape[1], device=x.device)
        mask = (steps[None, :] < lengths[:, None]).to(torch.long)
        if FAMILIES[self.family].kind == "audio":
            inputs: dict[str, torch.Tensor] = {"input_values": x[..., 0]}
        else:
            inputs = {"input_ids": x}
            if token_type_ids is not None:
                inputs["token_type_ids"] = token_type_ids
        # A batch without padding runs without a mask: the same result, and transformers then
        # builds no attention masks (0.7 ms of a 6.8 ms forward of the shipped encoder).
        fwd = current()
        padded = fwd.padded if fwd is not None else bool((lengths != x.shape[1]).any())
        out = self.hf(**inputs, attention_mask=mask) if padded else self.hf(**inputs)
        if self.head:
            logits: torch.Tensor = out.logits
            return logits
        hidden: torch.Tensor = out.last_hidden_state  # (B, steps', H)
        frames = mask
        if hidden.shape[1] != mask.shape[1]:  # audio: the front end's frames
            frames = cast(Any, self.hf)._get_feature_vector_attention_mask(hidden.shape[1], mask)
        return _masked_mean(hidden, frames.unsqueeze(-1).to(hidden.dtype))

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> logits (B, labels) or pooled (B, hidden): every token is valid."""
        out = self.hf(pixel_values=x)
        if self.head:
            return cast(torch.Tensor, out.logits)
        hidden = cast(torch.Tensor, out.last_hidden_state)  # (B, tokens, H), layer normed
        return hidden.mean(1)

    def ffn_paths(self, prefix: str = "") -> list[tuple[str, str]]:
        """Each encoder layer's FFN pair, as module paths."""
        spec = FAMILIES[self.family]
        for path, ffn in spec.layouts:
            try:
                layers = cast(nn.ModuleList, self.encoder.get_submodule(path))
                for name in ffn:
                    layers[0].get_submodule(name)
            except (AttributeError, IndexError):
                continue
            root = f"{prefix}hf.{spec.attribute + '.' if self.head else ''}{path}"
            return [(f"{root}.{i}.{ffn[0]}", f"{root}.{i}.{ffn[1]}") for i in range(len(layers))]
        tried = ", ".join(f"{path}.N.{{{', '.join(ffn)}}}" for path, ffn in spec.layouts)
        raise ArchitectureError(
            f"{type(self.encoder).__name__}: no encoder layer FFNs at {tried} (this transformers "
            "release lays the model out otherwise)"
        )


def _family(config: dict[str, Any]) -> str:
    family = str(config.get("model_type", ""))
    if family not in FAMILIES:
        raise ArchitectureError(
            f"transformers model_type {family!r} is not supported; supported: "
            f"{', '.join(FAMILIES)}"
        )
    return family


def _has_head(config: dict[str, Any], head: bool | None) -> bool:
    """With a classification head: as asked, else as the config's ``architectures`` say."""
    if head is not None:
        return head
    names = config.get("architectures") or []
    heads = ("ForSequenceClassification", "ForImageClassification")
    return any(str(n).endswith(heads) for n in names) or not names


def _model_class(spec: Family, head: bool) -> tuple[Any, dict[str, Any]]:
    """The ``transformers`` class to build (with the head, or the encoder alone) and its
    keyword arguments: the encoder alone may go without its pooler."""
    model_cls = getattr(_transformers(), spec.classifier if head else spec.base)
    return model_cls, ({} if head or spec.pooler else {"add_pooling_layer": False})


def hf_encoder(config: dict[str, Any], head: bool = True) -> HFEncoder:
    """The factory a retrofitted checkpoint names: ``config`` is the ``transformers`` config
    (its ``to_dict()``); random weights (the checkpoint's load them)."""
    tf = _transformers()
    family = _family(config)
    spec = FAMILIES[family]
    hf_config = getattr(tf, spec.config).from_dict(dict(config))
    model_cls, kwargs = _model_class(spec, head)
    return HFEncoder(model_cls(hf_config, **kwargs).eval(), family, head)


def _load_source(source: Path | dict[str, Any], head: bool | None) -> HFEncoder:
    if isinstance(source, dict):
        return hf_encoder(source, _has_head(source, head))
    folder = Path(source)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{folder}: no config.json (a folder written by save_pretrained)")
    config = json.loads(config_file.read_text())
    family = _family(config)
    with_head = _has_head(config, head)
    spec = FAMILIES[family]
    model_cls, kwargs = _model_class(spec, with_head)
    try:
        hf = model_cls.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder}: cannot load the pretrained model: {err}") from None
    _own_memory(hf)
    return HFEncoder(hf.eval(), family, with_head)


def _own_memory(module: nn.Module) -> None:
    """Copy every parameter and buffer that ``from_pretrained`` left in a copy-on-write map of
    the weights file into memory of the process (tied tensors stay tied), as a loaded
    checkpoint's are: the kernel may drop a file map's pages under page-cache pressure and read
    them back from disk in the middle of a forward, and the plans read these weights for as
    long as the process runs."""
    copies: dict[tuple[object, ...], torch.Tensor] = {}
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.numel() == 0:
                continue
            # The same memory seen the same way: one tensor (a tie); any other view its own.
            key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
            if key not in copies:
                copies[key] = t.data.clone()
            t.data = copies[key]


def retrofit(
    source: str | Path | dict[str, Any],
    gates: str | Path | dict[str, Any] | None = None,
    max_length: int | None = None,
    head: bool | None = None,
) -> GatedNetwork:
    """Gate every FFN of a Hugging Face encoder, keeping its weights.

    ``source``: a local ``save_pretrained`` folder, or a ``transformers`` config as a dict (with
    ``model_type``; random weights). ``gates``: a model config file (or mapping) whose gate
    keys (``use_dynamic_pruning``, ``dynamic_pruning_config``, ...) apply; its ``model``
    section, if any, is replaced. ``max_length``: the longest request, in samples (audio,
    default 4 s at 16 kHz) or tokens (text, default and at most the position embeddings'); for
    ViT the tokens every image becomes (patches and the CLS token), its only allowed value.
    ``head``: keep (True) or drop (False) the classification head; default: as the source's
    ``architectures`` say. The gates' parameters start at the configuration's initial values;
    fit them afterwards.
    """
    module = _load_source(source if isinstance(source, dict) else Path(source), head)
    config: Any = module.hf.config  # a transformers PretrainedConfig
    hf_config = config.to_dict()
    kind = FAMILIES[module.family].kind
    in_channels = 1
    if kind == "image":
        (in_channels, _, _), tokens = image_geometry(config)
        if max_length is not None and max_length != tokens:
            raise ConfigError(
                f"max_length {max_length}: every image is {tokens} tokens (its patches and the "
                "CLS token), the model's only length; leave max_length unset"
            )
        max_length = tokens
    if kind == "text":
        positions = int(config.max_position_embeddings)
        if module.family == "roberta":  # positions start after the pad token's
            positions -= int(config.pad_token_id) + 1
        if max_length is not None and max_length > positions:
            raise ConfigError(
                f"max_length {max_length} exceeds the model's {positions} positions"
            )
        max_length = max_length or positions
    max_length = max_length or 16000 * 4
    if isinstance(gates, (str, Path)):
        base = load_config(gates).model_dump(mode="json")
    else:
        base = dict(gates or {})
    base.pop("model", None)
    output = module.gated_contract.outputs[0]
    base["model"] = {
        "name": FACTORY,
        "args": {"config": hf_config, "head": module.head},
        "in_channels": in_channels,
        "num_classes": int(output.shape[1]),
        "max_length": int(max_length),
        "ffns": [list(pair) for pair in module.ffn_paths()],
    }
    cfg: ModelConfig = parse_config(base, "retrofit config")
    return attach_gates(module, cfg).eval()
