"""The PyTorch peer's DeepLab-v2 R101 train step (``bench`` of
``/work/shared/bench/anchor_torch_deeplabv2.py``, carried as ``.devcarry/anchor_torch_deeplabv2.py``)
at the configurations our step is compared with: bf16 autocast, channels-last, 512x1024, batch 8
and batch 2, each with frozen BatchNorm (as both references train, and as our step) and with
training BatchNorm (the anchor's own ``same-run`` rows).

    python3 -m benchmarks.peer_step .devcarry/anchor_torch_deeplabv2.py
    python3 -m benchmarks.peer_step ANCHOR --configs 8:bf16_cl_frozen,2:bf16_cl_frozen

One JSON line per configuration (a ``FAIL`` line where one fails, e.g. no CUDA device), all rows
in ``$OUT/anchor_torch.json``.
"""
import argparse
import importlib.util
import json
import os
import sys

CONFIGS = "8:bf16_cl_frozen,2:bf16_cl_frozen,8:bf16_cl,2:bf16_cl"


def load_anchor(path: str):
    spec = importlib.util.spec_from_file_location("anchor_torch_deeplabv2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its command line sits under ``if __name__ == "__main__"``
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("anchor", help="path of anchor_torch_deeplabv2.py")
    parser.add_argument("--configs", default=CONFIGS, help="batch:mode pairs (modes: the anchor's bench())")
    parser.add_argument("--size", default="512,1024")
    args = parser.parse_args(argv)
    anchor = load_anchor(args.anchor)
    import torch

    print(json.dumps(dict(torch=torch.__version__, cuda=torch.cuda.is_available(),
                          device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)), flush=True)
    hw = tuple(int(v) for v in args.size.split(","))
    rows = []
    for config in args.configs.split(","):
        batch, mode = config.split(":")
        try:
            row = anchor.bench(int(batch), hw, mode)
        except Exception as e:  # noqa: BLE001 - one configuration's failure (memory, no CUDA) is a row
            print("FAIL", batch, mode, repr(e)[:300], flush=True)
            continue
        print(json.dumps(row), flush=True)
        rows.append(row)
    with open(os.path.join(os.environ.get("OUT", "."), "anchor_torch.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
