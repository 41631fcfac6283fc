"""pytorch-fid reference outputs for tests/test_inception.py (run with a python that has torch,
torchvision and pytorch-fid; diffusax itself never imports torch):

    /path/to/torch-env/bin/python tests/inception_reference.py OUT_DIR [--seed 0] [--check]

Builds pytorch-fid's FID Inception-v3 (`pytorch_fid.inception.InceptionV3([3], resize_input=True,
normalize_input=True, use_fid_inception=True)`, i.e. `fid_inception_v3()` with its FIDInceptionA/C/E
patches) with *random* seeded weights instead of the published ones (no download: the package's
`load_state_dict_from_url` is pointed at the random state dict). BatchNorm running statistics are
first calibrated on random upsampled images like the test batch (cumulative average in train mode)
so that activations stay moderate through all 94 conv layers, then perturbed (mean shift, variance
scale).

Writes to OUT_DIR:
  fid_inception_random.pth         the state dict, torch.save zip layout
  fid_inception_random_legacy.pth  the same, legacy layout (_use_new_zipfile_serialization=False)
  reference.npz  images uint8 [4, 64, 80, 3]; pool [4, 2048] (InceptionV3 block 3) and logits
                 [4, 1008] (fc of pool) of images / 255; resize_{up,down}_{in,out}:
                 F.interpolate(bilinear, align_corners=False) to 299x299 of float32 NCHW arrays
                 (64x80 up, 331x317 down); with --check also pool64/logits64 of the same network
                 in float64, and a check that fc(pool) is Inception3.forward's output.
"""
from __future__ import annotations

import argparse
import copy
import os

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_fid import inception as pfi


def random_fid_inception(seed: int) -> torch.nn.Module:
  """fid_inception_v3()'s network (pytorch-fid's own blocks) with seeded random weights, eval mode."""
  net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = pfi.FIDInceptionE_1(1280)
  net.Mixed_7c = pfi.FIDInceptionE_2(2048)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
        m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration pass
      elif isinstance(m, torch.nn.Linear):
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    net.train()
    calib = F.interpolate(torch.rand(2, 3, 64, 80, generator=g), size=(299, 299), mode="bilinear",
                          align_corners=False)
    net(2 * calib - 1)  # running stats = statistics of inputs like the test batch's
    net.eval()
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        std = m.running_var.sqrt()
        m.running_mean.add_(0.1 * std * torch.randn(std.shape, generator=g))
        m.running_var.mul_(torch.exp(0.1 * torch.randn(std.shape, generator=g)))
  return net


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("out_dir")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--check", action="store_true", help="also float64 outputs and fc(pool) == Inception3.forward")
  args = ap.parse_args()
  os.makedirs(args.out_dir, exist_ok=True)
  torch.set_num_threads(2)
  net = random_fid_inception(args.seed)
  sd = net.state_dict()
  torch.save(sd, os.path.join(args.out_dir, "fid_inception_random.pth"))
  torch.save(sd, os.path.join(args.out_dir, "fid_inception_random_legacy.pth"),
             _use_new_zipfile_serialization=False)

  # pytorch-fid's own wrapper (resize -> 2x-1 -> blocks 0..3), loading the random state dict.
  pfi.load_state_dict_from_url = lambda *a, **k: copy.deepcopy(sd)
  model = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()

  rng = np.random.default_rng(args.seed)
  images = rng.integers(0, 256, (4, 64, 80, 3), dtype=np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # as torchvision's ToTensor
  out = {"images": images}
  with torch.no_grad():
    pool = model(x)[0].flatten(1)
    out["pool"], out["logits"] = pool.numpy(), net.fc(pool).numpy()
    if args.check:
      full = net(2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1)
      assert torch.allclose(full, net.fc(pool), rtol=1e-5, atol=1e-5), "fc(pool) != Inception3.forward"
      m64, n64 = copy.deepcopy(model).double(), copy.deepcopy(net).double()
      p64 = m64(x.double())[0].flatten(1)
      out["pool64"], out["logits64"] = p64.numpy(), n64.fc(p64).numpy()
    for name, shape in (("up", (2, 3, 64, 80)), ("down", (2, 3, 331, 317))):
      a = torch.from_numpy(rng.random(shape, dtype=np.float32))
      out[f"resize_{name}_in"] = a.numpy()
      out[f"resize_{name}_out"] = F.interpolate(a, size=(299, 299), mode="bilinear",
                                                align_corners=False).numpy()
  np.savez(os.path.join(args.out_dir, "reference.npz"), **out)
  print(f"wrote {args.out_dir}: torch {torch.__version__}, pool |max| {np.abs(out['pool']).max():.3g}, "
        f"logits |max| {np.abs(out['logits']).max():.3g}")


if __name__ == "__main__":
  main()
