"""The peer of ``peer_bench.py``: PyTriton serving ``transformers`` encoders as users run them.

    <peer venv>/bin/python benchmarks/peer_pytriton.py --http-port P \\
        --model bert-base=path/to/bert-folder --model hubert-base=path/to/hubert-folder

Runs in its own virtual environment (``nvidia-pytriton`` pins numpy < 2): ``torch``,
``transformers`` and ``nvidia-pytriton`` only, none of this project's code. Each ``--model``
is a local ``save_pretrained`` folder of a sequence classifier, loaded with ``from_pretrained``
and run eagerly under ``torch.inference_mode`` (torch's default threads), behind Triton's
dynamic batcher (``--max-batch`` requests, ``--delay-us`` queue delay). Text models take
``input_ids`` and ``attention_mask`` INT64 ``[batch, T]``; audio models ``input`` FP32
``[batch, samples]``. Both answer ``logits`` FP32 ``[batch, labels]``. Triton batches only
requests of one shape (no ragged batching), as a plain PyTriton deployment does.
"""

from __future__ import annotations

import argparse
import os
import sysconfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--model", action="append", required=True, help="name=folder")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--delay-us", type=int, default=1000)
    args = p.parse_args()
    # Triton's Python-backend stub links libpython: it must find it.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    os.environ["LD_LIBRARY_PATH"] = libdir + ":" + os.environ.get("LD_LIBRARY_PATH", "")

    import numpy as np
    import torch
    import transformers as tf
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    config = TritonConfig(http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port)
    with Triton(config=config) as triton:
        for spec in args.model:
            name, folder = spec.split("=", 1)
            config = tf.AutoConfig.from_pretrained(folder, local_files_only=True)
            audio = config.model_type in ("hubert", "wav2vec2", "wavlm")
            auto = (tf.AutoModelForAudioClassification if audio
                    else tf.AutoModelForSequenceClassification)
            model = auto.from_pretrained(folder, local_files_only=True).eval()

            if audio:
                @batch
                def infer(input: np.ndarray, model=model) -> dict[str, np.ndarray]:  # noqa: A002
                    with torch.inference_mode():
                        out = model(input_values=torch.from_numpy(input)).logits
                    return {"logits": out.numpy()}

                inputs = [Tensor(name="input", dtype=np.float32, shape=(-1,))]
            else:
                @batch
                def infer(input_ids: np.ndarray, attention_mask: np.ndarray,
                          model=model) -> dict[str, np.ndarray]:
                    with torch.inference_mode():
                        out = model(input_ids=torch.from_numpy(input_ids),
                                    attention_mask=torch.from_numpy(attention_mask)).logits
                    return {"logits": out.numpy()}

                inputs = [Tensor(name="input_ids", dtype=np.int64, shape=(-1,)),
                          Tensor(name="attention_mask", dtype=np.int64, shape=(-1,))]
            triton.bind(
                model_name=name, infer_func=infer, inputs=inputs,
                outputs=[Tensor(name="logits", dtype=np.float32, shape=(-1,))],
                config=ModelConfig(max_batch_size=args.max_batch, batcher=DynamicBatcher(
                    max_queue_delay_microseconds=args.delay_us)),
                strict=False,
            )
        triton.serve()


if __name__ == "__main__":
    main()
