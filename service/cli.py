"""The ``gated`` command: train, evaluate (and the service commands as they land).

Errors the user can fix (bad config, missing checkpoint, bad flags) print one clear message on
stderr and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

PRETRAINED = Path(__file__).resolve().parent.parent / "models" / "pretrained" / "mnist1d-conv"

logger = logging.getLogger("gated")


def _knob(name: str) -> Callable[[str], float]:
    """An argparse type checking a gate knob against models.GateSettings (its bounds)."""

    def parse(text: str) -> float:
        from models.errors import ConfigError
        from models.gate_config import GateSettings

        try:
            value = float(text)
            GateSettings.parse({name: value})
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: not a number: {text!r}") from None
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix("gate: ")) from None
        return value

    return parse


def _cmd_train(args: argparse.Namespace) -> int:
    from models import load_config
    from models.train import train

    cfg = load_config(args.config)
    if args.seed is not None:
        training = cfg.training.model_copy(update={"seed": args.seed})
        cfg = cfg.model_copy(update={"training": training})
    logger.info("training %s on %s -> %s", cfg.model.name, cfg.data.dataset, args.out)
    _, report = train(cfg, args.out, device=args.device, progress=not args.quiet)
    summary = {
        "out": str(args.out),
        "seconds": report.seconds,
        "params": report.params,
        **{f"{mode}_accuracy": r["accuracy"] for mode, r in report.test.items()},
        **{f"{mode}_flops_ratio": r["flops_ratio"] for mode, r in report.test.items()},
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    with torch.no_grad():  # scoped: main() may run inside a longer process (tests)
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    from models import load_checkpoint, resolve_device, settings_for
    from models.data import load_dataset, load_mnist1d, refuse_mnist1d
    from models.evaluate import evaluate

    model = load_checkpoint(args.checkpoint, resolve_device(args.device))
    data = model.config.data
    first = model.contract().data_inputs[0]
    if data.dataset == "mnist1d":
        refuse_mnist1d(first)  # token ids, an image: say why MNIST-1D does not fit
        seed = data.seed if args.data_seed is None else args.data_seed
        _, test = load_mnist1d(seed)
    elif args.data_seed is not None:
        sys.stderr.write("gated evaluate: error: --data-seed is for MNIST-1D; this checkpoint "
                         f"was trained on {data.path}\n")
        return 2
    else:
        seed = data.seed
        _, test = load_dataset(model.config, first)
    settings = settings_for(model.config, args.gate_mode, args.keep_ratio, args.threshold)
    result = evaluate(model, test, settings).as_dict()
    result["data_seed"] = seed
    result["checkpoint"] = str(args.checkpoint)
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        for key, value in result.items():
            sys.stdout.write(f"{key:>22}: {value}\n")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from service.app import serve
    from service.settings import SettingsError, load_settings

    try:
        settings = load_settings(
            args.config,
            model_repository=args.model_repository,
            host=args.host,
            port=args.port,
            grpc_port=args.grpc_port,
            device=args.device,
        )
    except SettingsError as err:
        sys.stderr.write(f"gated serve: error: {err}\n")
        return 2
    return serve(settings)


def _cmd_export(args: argparse.Namespace) -> int:
    from models.export import main as export_main

    return export_main(args.rest)


def _cmd_bench(args: argparse.Namespace) -> int:
    from models.bench import main as bench_main

    return bench_main(args.rest)


def _cmd_fit(args: argparse.Namespace) -> int:
    from models import load_checkpoint, resolve_device
    from models.data import load_dataset
    from models.fit import fit

    model = load_checkpoint(args.checkpoint, resolve_device(args.device))
    cfg = model.config
    if args.data is not None:  # the user's own tensor file instead of the checkpoint's data
        data = cfg.data.model_copy(update={"dataset": "file", "path": args.data})
        cfg = cfg.model_copy(update={"data": data})
    train_set, test_set = load_dataset(cfg, model.contract().data_inputs[0])
    logger.info("fitting the gates of %s on %d rows -> %s", args.checkpoint, len(train_set),
                args.out)
    _, report = fit(
        model, train_set, test_set, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        keep_ratios=args.keep_ratios, static_gates=args.static_gates or args.static_only,
        predictors=not args.static_only,
        label_weight=args.label_weight, seed=args.seed, out_dir=args.out,
        progress=not args.quiet,
    )
    summary = {
        "out": str(args.out), "seconds": report.seconds, "steps": report.steps,
        "trained_params": report.trained_params, "frozen_params": report.frozen_params,
        "distill_loss_first_epoch": report.distill_loss_first_epoch,
        "distill_loss_last_epoch": report.distill_loss_last_epoch,
        "test_distill_before": report.test_distill_before,
        "test_distill_after": report.test_distill_after,
        **{f"{mode}_accuracy": r["accuracy"] for mode, r in report.test.items()},
        **{f"{mode}_flops_ratio": r["flops_ratio"] for mode, r in report.test.items()},
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def _keep_ratios(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") \
            from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"keep ratios must lie in (0, 1], got {text!r}")
    return values


def _cmd_retrofit(args: argparse.Namespace) -> int:
    from models import save_checkpoint
    from models.retrofit import retrofit

    source: Path | dict[str, object] = args.source
    if args.hf_config:
        source = json.loads(args.source.read_text())  # a transformers config.json: random init
    logger.info("retrofitting %s -> %s", args.source, args.out)
    net = retrofit(source, args.config, max_length=args.max_length, head=args.head)
    save_checkpoint(net, args.out, metadata={"retrofit": {"source": str(args.source)}})
    widths = net.gated_widths()
    sys.stdout.write(json.dumps({
        "out": str(args.out),
        "gated_ffns": len(widths),
        "gated_channels": sum(widths.values()),
        "params": sum(p.numel() for p in net.parameters()),
    }) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gated", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a gated network from a YAML config")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, help="override training.seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="accuracy and executed FLOPs on the data's test split")
    p.add_argument("--checkpoint", type=Path, default=PRETRAINED)
    p.add_argument("--gate-mode", choices=["dense", "static", "dynamic"], default="dynamic")
    p.add_argument("--keep-ratio", type=_knob("keep_ratio"), help="top-k fraction of open channels")
    p.add_argument(
        "--threshold", type=_knob("threshold"), help="keep channels whose gate is >= this"
    )
    p.add_argument("--data-seed", type=int, help="mnist1d generation seed (default: config's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "fit",
        help="fit a checkpoint's predictors (and static gates) on its frozen base by distillation",
    )
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument("--data", type=Path, help=".npz/.safetensors file (default: the config's data)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--keep-ratios", type=_keep_ratios, default=[1.0, 0.5, 0.25],
                   help="sampled per step, e.g. 1,0.5,0.25")
    p.add_argument("--static-gates", action="store_true", help="train the static gates too")
    p.add_argument("--static-only", action="store_true",
                   help="train the static gates alone, no predictor (the static baseline)")
    p.add_argument("--label-weight", type=float, default=0.0,
                   help="weight of the cross-entropy on labels, where the data has them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser(
        "retrofit",
        help="gate the FFNs of a Hugging Face encoder (BERT, RoBERTa, Wav2Vec2, HuBERT, WavLM, "
        "ViT)",
        description="Reads a local save_pretrained folder (or, with --hf-config, a transformers "
        "config.json for random weights) and writes a checkpoint the other commands load. "
        "Needs pip install 'gated-serve[hf]'.",
    )
    p.add_argument("source", type=Path, help="save_pretrained folder (or config.json)")
    p.add_argument("--hf-config", action="store_true", help="source is a config.json: random init")
    p.add_argument("--config", type=Path, help="model config YAML with the gate keys")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest request: samples (audio; default 64000) or tokens (text; "
                   "default the model's positions); ViT: leave unset (its patches + 1)")
    head = p.add_mutually_exclusive_group()
    head.add_argument("--head", dest="head", action="store_true", default=None,
                      help="keep the classification head (output logits)")
    head.add_argument("--no-head", dest="head", action="store_false",
                      help="the encoder alone (output pooled: mean of the last hidden states "
                      "over the valid steps; ViT: over every token)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.set_defaults(func=_cmd_retrofit)

    p = sub.add_parser(
        "serve",
        help="serve a model repository over the V2 inference protocol",
        description="Flags override GATED_* environment variables, which override --config.",
    )
    p.add_argument("--model-repository", type=Path, help="default: the shipped checkpoints")
    p.add_argument("--host", help="default 127.0.0.1")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--grpc-port", type=int, help="default 8001; 0 turns gRPC off")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    p.add_argument("--config", type=Path, help="settings YAML file (keys as in Settings)")
    p.set_defaults(func=_cmd_serve)
    for name, func, text in (
        ("export", _cmd_export, "write a statically pruned, smaller checkpoint (--help for flags)"),
        ("bench", _cmd_bench, "time dense vs masked vs sparse forwards (--help for flags)"),
    ):
        # Their own parsers read the rest of the command line (see main).
        sub.add_parser(name, help=text, add_help=False).set_defaults(func=func, forward=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "forward", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from models.errors import ModelError

    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ModelError, RuntimeError) as err:
        sys.stderr.write(f"gated {args.command}: error: {err}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
