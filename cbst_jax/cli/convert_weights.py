"""Converts PyTorch / MXNet checkpoints into weights files for ``cbst_jax.models``.

  cbst-convert-weights KIND IN OUT [--num-classes 19] [--model NAME] [--seed 0]

(``cbst-convert-weights`` is ``python -m cbst_jax.cli.convert_weights``.)
KINDs (default target model in brackets):
  torchvision-resnet101  torchvision ImageNet ResNet-101 state dict   [deeplabv2_resnet101]
  deeplab-init           Caffe-converted DeepLab-v2 init (`Scale.` keys) [deeplabv2_resnet101]
  torchvision-vgg16      torchvision ImageNet VGG16 state dict       [fcn8s_vgg16]
  mxnet-resnet38         CBST MXNet ResNet-38 `.params` (ImageNet or source model) [resnet38]
  mit                    NVlabs/mmseg MiT ImageNet encoder `mit_b0.pth`..`mit_b5.pth` [daformer_mit_bN]
  hf-segformer           transformers SegFormer state dict, `.safetensors` or `.bin`
                         (`SegformerForSemanticSegmentation`, `SegformerModel`) [segformer_mit_bN]
  mmseg-daformer         mmseg EncoderDecoder with DAFormer's head (lhoyer/DAFormer) [daformer_mit_bN]

The MiT kinds read the variant (B0..B5: widths and depths) off the checkpoint when --model is not
given.

OUT records the architecture, the class count (none when the head is freshly initialised: a
backbone-only init), the input normalisation the weights expect and, for 19/16/13 classes, the
class names and palette (`cbst_jax.models.read_metadata`).

Heads absent from the checkpoint or trained for another class count are initialised fresh
(seed `--seed`); any other missing, unexpected or mis-shaped key is an error. The torch kinds
need PyTorch (`pip install torch`, or cbst_jax's `[convert]` extra), imported only when used;
checkpoints load with `torch.load(..., weights_only=True)`, so a pickle holding anything but
tensors is refused; `.safetensors` files are read with the `safetensors` package (no pickle).
Bad input is a one-line error and exit status 2. The library: ``cbst_jax.models.conversion``.
"""
from __future__ import annotations

import os
import sys

from cbst_jax.cli import args as cli_args


def main(argv=None) -> int:
    from cbst_jax import models
    from cbst_jax.models.conversion import KINDS, ConvertError, convert, load_checkpoint

    parser = cli_args.parser("cbst-convert-weights", __doc__)
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--model", default=None, help="target model (default: the kind's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of freshly initialised heads")
    args = parser.parse_args(argv)

    def command() -> int:
        import jax

        if args.model is not None and args.model not in models.MODELS:
            raise ConvertError(f"--model {args.model!r}, expected one of {', '.join(sorted(models.MODELS))}")
        if args.num_classes < 1:
            raise ConvertError(f"--num-classes {args.num_classes}, expected a positive integer")
        out_dir = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(out_dir):
            raise ConvertError(f"{args.output}: folder {out_dir} does not exist")
        source = load_checkpoint(args.kind, args.input)
        try:
            variables, meta = convert(args.kind, source, args.num_classes, args.model, args.seed)
        except ConvertError as exc:
            raise ConvertError(f"{args.input}: {exc}") from None
        meta["source"] = os.path.basename(args.input)
        models.save_variables(args.output, variables, meta)
        n = sum(v.size for v in jax.tree_util.tree_leaves(variables["params"]))
        classes = meta["num_classes"] if meta["num_classes"] is not None else "none (backbone-only init)"
        print(f"{args.output}: {meta['architecture']} with {n:,} params, normalization={meta['normalization']!r}, "
              f"classes: {classes}, fresh heads: {', '.join(meta['fresh_heads']) or 'none'}, "
              f"dropped {meta['dropped']} checkpoint entries", file=sys.stderr)
        return 0

    return cli_args.one_line_errors(command, (ConvertError, models.WeightMismatchError))


if __name__ == "__main__":
    sys.exit(main())
