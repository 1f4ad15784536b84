"""Retrofit pretrained Hugging Face encoders: gate every FFN of a ``transformers`` model in place.

Supported today: the audio encoders **Wav2Vec2, HuBERT and WavLM** with a sequence
classification head (``<Family>ForSequenceClassification``), which take raw audio and return
logits, the server's default contract (FP32 ``input`` [batch, samples, 1] -> ``logits``). The
model comes from a local folder written by ``save_pretrained`` (``from_pretrained`` on a path,
never a download) or from a ``transformers`` config (random weights, for speed work). Each
encoder layer's ``feed_forward.intermediate_dense`` / ``output_dense`` pair becomes a gated FFN
(:func:`models.attach_gates`), with the gate configuration of a model config file (the
parameter guide's keys), and the result is an ordinary checkpoint: ``config.yaml`` names the
factory :func:`audio_classifier` with the ``transformers`` config as its arguments, so
``load_checkpoint``, ``gated evaluate`` and ``gated serve`` rebuild it without the source
folder.

Padding: a request's samples are its length; the attention mask the encoder gets is built from
the lengths, and HF derives the frame-level mask after the convolutional front end, which is
what the gated layers' predictors see too (their lengths follow the front end's convolutions).
Front ends whose output depends on padding (``feat_extract_norm: group``, the base configs'
group-norm feature extractor) make the network not padding invariant, so the server batches
such a model only with requests of the same length.

``transformers`` is an optional dependency: ``pip install 'gated-serve[hf]'``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.config import ModelConfig, load_config, parse_config
from models.errors import ArchitectureError, ConfigError
from models.networks import GatedNetwork, attach_gates

# family (the HF config's model_type) -> (config class, classification model class, the
# attribute of the base model inside the classifier)
AUDIO_FAMILIES: dict[str, tuple[str, str, str]] = {
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification", "wav2vec2"),
    "hubert": ("HubertConfig", "HubertForSequenceClassification", "hubert"),
    "wavlm": ("WavLMConfig", "WavLMForSequenceClassification", "wavlm"),
}
FACTORY = "models.retrofit:audio_classifier"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ArchitectureError(
            "retrofitting Hugging Face models needs transformers: pip install 'gated-serve[hf]'"
        ) from None
    return transformers


class AudioClassifier(nn.Module):
    """A ``transformers`` audio classifier behind the server's contract:
    ``forward(x (B, samples, 1), lengths (B,)) -> logits (B, labels)``."""

    def __init__(self, hf: nn.Module, family: str) -> None:
        super().__init__()
        self.hf = hf
        self.family = family
        # Group norm over time sees the padding (docs/model-contract.md, "Lengths and padding").
        self.padding_invariant = getattr(hf.config, "feat_extract_norm", "layer") != "group"

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(x.shape[1], device=x.device)
        mask = (steps[None, :] < lengths[:, None]).to(torch.long)
        logits: torch.Tensor = self.hf(input_values=x[..., 0], attention_mask=mask).logits
        return logits

    def ffn_paths(self, prefix: str = "") -> list[tuple[str, str]]:
        """Each encoder layer's (intermediate_dense, output_dense), as module paths."""
        base = getattr(self.hf, AUDIO_FAMILIES[self.family][2])
        n = len(base.encoder.layers)
        root = f"{prefix}hf.{AUDIO_FAMILIES[self.family][2]}.encoder.layers"
        return [(f"{root}.{i}.feed_forward.intermediate_dense",
                 f"{root}.{i}.feed_forward.output_dense") for i in range(n)]


def _family(config: dict[str, Any]) -> str:
    family = str(config.get("model_type", ""))
    if family not in AUDIO_FAMILIES:
        raise ArchitectureError(
            f"transformers model_type {family!r} is not supported; supported: "
            f"{', '.join(AUDIO_FAMILIES)} (sequence classification)"
        )
    return family


def audio_classifier(config: dict[str, Any]) -> AudioClassifier:
    """The factory a retrofitted checkpoint names: ``config`` is the ``transformers`` config
    (its ``to_dict()``); random weights (the checkpoint's load them)."""
    tf = _transformers()
    family = _family(config)
    config_cls, model_cls, _ = AUDIO_FAMILIES[family]
    hf_config = getattr(tf, config_cls).from_dict(dict(config))
    return AudioClassifier(getattr(tf, model_cls)(hf_config).eval(), family)


def _load_source(source: Path | dict[str, Any]) -> AudioClassifier:
    tf = _transformers()
    if isinstance(source, dict):
        return audio_classifier(source)
    folder = Path(source)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{folder}: no config.json (a folder written by save_pretrained)")
    family = _family(json.loads(config_file.read_text()))
    model_cls = getattr(tf, AUDIO_FAMILIES[family][1])
    try:
        hf = model_cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder}: cannot load the pretrained model: {err}") from None
    return AudioClassifier(hf.eval(), family)


def retrofit(
    source: str | Path | dict[str, Any],
    gates: str | Path | dict[str, Any] | None = None,
    max_length: int = 16000 * 4,
) -> GatedNetwork:
    """Gate every FFN of a Hugging Face audio classifier, keeping its weights.

    ``source``: a local ``save_pretrained`` folder, or a ``transformers`` config as a dict (with
    ``model_type``; random weights). ``gates``: a model config file (or mapping) whose gate
    keys (``use_dynamic_pruning``, ``dynamic_pruning_config``, ...) apply; its ``model``
    section, if any, is replaced. ``max_length``: the longest request, in samples. The gates'
    parameters start at the configuration's initial values; fit them afterwards.
    """
    module = _load_source(source if isinstance(source, dict) else Path(source))
    config: Any = module.hf.config  # a transformers PretrainedConfig
    hf_config = config.to_dict()
    if isinstance(gates, (str, Path)):
        base = load_config(gates).model_dump(mode="json")
    else:
        base = dict(gates or {})
    base.pop("model", None)
    base["model"] = {
        "name": FACTORY,
        "args": {"config": hf_config},
        "in_channels": 1,
        "num_classes": int(config.num_labels),
        "max_length": int(max_length),
        "ffns": [list(pair) for pair in module.ffn_paths()],
    }
    cfg: ModelConfig = parse_config(base, "retrofit config")
    return attach_gates(module, cfg).eval()
