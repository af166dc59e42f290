"""Full-size numeric parity on a GPU: `deeplabv2_resnet101` and `fcn8s_vgg16` against
references built from torchvision (random weights, random BN running statistics, eval).

DeepLab-v2 reference: torchvision resnet101 with the stride moved to each first 1x1 conv
(Caffe), layer3/4 dilated 2/4 in every block, ceil-mode stem pool, ASPP-v2 `layer5`.
FCN-8s reference: torchvision vgg16 copied into pytorch-fcn's FCN8s (pad 100, fc6 7x7).
Both are converted with `cbst_jax.convert_weights` and compared in float32 (torch with
TF32 off) at JAX's default matmul precision and at 'highest'; DeepLab-v2 in both atrous modes
(dilated convolutions, and the same convolutions undilated on space-to-batch phase grids). Prints one JSON line per
comparison and writes $OUT/parity_gpu.json.

  python -m benchmarks.check_parity_gpu          # ~1-2 min on an H100
  python -m benchmarks.check_parity_gpu --smoke  # CPU, tiny inputs
"""
import argparse
import json
import os
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cbst_jax import convert_weights, models


class DeepLabV2Reference(nn.Module):
    """Res_Deeplab from torchvision parts (state dict keys as the PyTorch UDA code)."""

    def __init__(self, num_classes):
        super().__init__()
        r = torchvision.models.resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
        r.maxpool.ceil_mode = True
        for layer, dilation in ((r.layer2, 1), (r.layer3, 2), (r.layer4, 4)):
            first = layer[0]
            first.conv1.stride, first.conv2.stride = first.conv2.stride, (1, 1)  # Caffe: stride on the 1x1
            for block in layer:
                block.conv2.dilation, block.conv2.padding = (dilation, dilation), (dilation, dilation)
        self.conv1, self.bn1, self.maxpool = r.conv1, r.bn1, r.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4
        self.layer5 = nn.Module()
        self.layer5.conv2d_list = nn.ModuleList(nn.Conv2d(2048, num_classes, 3, padding=d, dilation=d)
                                                for d in (6, 12, 18, 24))

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return sum(c(x) for c in self.layer5.conv2d_list)


class FCN8sReference(nn.Module):
    """pytorch-fcn's FCN8s; `from_vgg` copies torchvision vgg16 weights (fc6/fc7 folded)."""

    def __init__(self, num_classes, vgg):
        super().__init__()
        self.features = vgg.features
        for m in self.features:
            if isinstance(m, nn.MaxPool2d):
                m.ceil_mode = True
        self.features[0].padding = (100, 100)
        self.fc6, self.fc7 = nn.Conv2d(512, 4096, 7), nn.Conv2d(4096, 4096, 1)
        with torch.no_grad():
            self.fc6.weight.copy_(vgg.classifier[0].weight.view(4096, 512, 7, 7))
            self.fc6.bias.copy_(vgg.classifier[0].bias)
            self.fc7.weight.copy_(vgg.classifier[3].weight.view(4096, 4096, 1, 1))
            self.fc7.bias.copy_(vgg.classifier[3].bias)
        c = num_classes
        self.score_fr, self.score_pool3, self.score_pool4 = nn.Conv2d(4096, c, 1), nn.Conv2d(256, c, 1), nn.Conv2d(512, c, 1)
        self.upscore2 = nn.ConvTranspose2d(c, c, 4, 2, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(c, c, 4, 2, bias=False)
        self.upscore8 = nn.ConvTranspose2d(c, c, 16, 8, bias=False)

    def forward(self, x):
        h, w = x.shape[2:]
        pools = []
        for m in self.features:
            x = m(x)
            if isinstance(m, nn.MaxPool2d):
                pools.append(x)
        x = self.score_fr(F.relu(self.fc7(F.relu(self.fc6(x)))))
        x = self.upscore2(x)
        x = x + self.score_pool4(pools[3])[:, :, 5:5 + x.shape[2], 5:5 + x.shape[3]]
        x = self.upscore_pool4(x)
        x = x + self.score_pool3(pools[2])[:, :, 9:9 + x.shape[2], 9:9 + x.shape[3]]
        return self.upscore8(x)[:, :, 31:31 + h, 31:31 + w]


def randomize_bn(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return module.eval()


def torch_input(x):
    x = (x.astype(np.float32) / 255 - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def compare(name, modules, variables, reference, x, device):
    """``modules``: {atrous mode: JAX module} compared with one torch forward of ``reference``."""
    with torch.no_grad():
        want = reference.to(device)(torch_input(x).to(device)).cpu().numpy().transpose(0, 2, 3, 1)
    results = []
    for atrous, module in modules.items():
        for precision in ("default", "highest"):
            with jax.default_matmul_precision(precision):
                t = time.perf_counter()
                got = np.asarray(jax.jit(module.apply)(variables, x))
                seconds = time.perf_counter() - t
            err = got.astype(np.float64) - want
            results.append(dict(model=name, atrous=atrous, precision=precision, shape=list(got.shape),
                                rel_err_l2=float(np.linalg.norm(err) / np.linalg.norm(want)),
                                rel_err_max=float(np.abs(err).max() / np.abs(want).max()),
                                argmax_agreement=float((got.argmax(-1) == want.argmax(-1)).mean()),
                                seconds_incl_compile=seconds, device=jax.devices()[0].device_kind))
            print(json.dumps(results[-1]), flush=True)
    return results


def write(results):
    with open(os.path.join(os.environ.get("OUT", "."), "parity_gpu.json"), "w") as f:
        json.dump(results, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, 1 image of 65x97 (DeepLab) / 64x64 (FCN)")
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    rng = np.random.RandomState(0)
    results = []

    torch.manual_seed(0)
    ref = randomize_bn(DeepLabV2Reference(19))
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    variables, _ = convert_weights.convert("torchvision-resnet101", state, 19)
    modules = {atrous: models.get_model("deeplabv2_resnet101", 19, normalization="imagenet", atrous=atrous)
               for atrous in ("dilated", "space_to_batch")}
    hw = (65, 97) if args.smoke else (512, 1024)
    results += compare("deeplabv2_resnet101", modules, variables, ref,
                       rng.randint(0, 256, (1, *hw, 3)).astype(np.uint8), device)
    write(results)
    del ref, state, variables

    vgg = torchvision.models.vgg16(weights=None)
    ref = FCN8sReference(19, vgg).eval()
    state = {k: v.numpy() for k, v in vgg.state_dict().items()}
    variables, _ = convert_weights.convert("torchvision-vgg16", state, 19)
    params = variables["params"]
    head_rng = np.random.RandomState(1)  # random heads (the fresh ones are zero / bilinear)
    with torch.no_grad():
        for name in models.FCN8s.head_names:
            for leaf in params[name]:
                params[name][leaf] = 0.01 * head_rng.randn(*params[name][leaf].shape).astype(np.float32)
            getattr(ref, name).weight.copy_(torch.from_numpy(params[name]["kernel"].transpose(3, 2, 0, 1).copy()))
            if "bias" in params[name]:
                getattr(ref, name).bias.copy_(torch.from_numpy(params[name]["bias"]))
    hw = (64, 64) if args.smoke else (500, 500)
    results += compare("fcn8s_vgg16", {"-": models.get_model("fcn8s_vgg16", 19)}, variables, ref,
                       rng.randint(0, 256, (1, *hw, 3)).astype(np.uint8), device)
    write(results)


if __name__ == "__main__":
    main()
