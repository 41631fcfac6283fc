"""diffusers `AutoencoderKL` weights -> `diffusax.nn.autoencoder.AutoencoderKL` params, without torch.

    params = load_diffusers("vae/diffusion_pytorch_model.safetensors", module)   # or a .bin / .pt file
    params = load_diffusers("stable-diffusion-v1-5/vae", module)                 # a diffusers folder
    module = module_from_diffusers_config(diffusers_config("stable-diffusion-v1-5/vae"))

The mapping is mechanical (see `diffusax.nn.autoencoder`): the Flax path
("encoder", "mid_block", "attentions_0", "to_out_0", "kernel") is the diffusers key
"encoder.mid_block.attentions.0.to_out.0.weight": every "<name>_<n>" component becomes "<name>.<n>",
the leaf kernel/scale becomes "weight" and bias stays "bias". Layouts:

    conv kernel    torch [out, in, kh, kw] (OIHW)   -> Flax [kh, kw, in, out] (HWIO)
    dense kernel   torch [out, in] (or [out, in, 1, 1])  -> Flax [in, out]
    norm / bias    [C] unchanged

Older diffusers attention names (query, key, value, proj_attn, from before diffusers 0.14) are renamed
to to_q, to_k, to_v, to_out.0 as diffusers does on load. The key set must match exactly: missing keys,
unexpected keys and shape mismatches are refused together in one ValueError. The original CompVis/LDM
layout ("encoder.down.0.block.0...") and full pipeline checkpoints ("first_stage_model." prefixes in a
.ckpt) are not read; convert them to diffusers' layout first (diffusers' conversion scripts).
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusax import storage
from diffusax.evaluation import torch_pickle
from diffusax.nn import layers
from diffusax.nn.autoencoder import AutoencoderKL

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
CONFIG_FILE = "config.json"
# Fields of AutoencoderKL that decide the parameters' shapes and meaning (a folder's config must agree).
ARCH_FIELDS = ("block_out_channels", "layers_per_block", "z_channels", "in_channels", "out_channels",
               "norm_groups", "mid_attention")
_DEPRECATED = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_DEPRECATED_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
# diffusers' AutoencoderKL.__init__ defaults, used for keys an (older) config.json leaves out.
_CONFIG_DEFAULTS = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1,
                        act_fn="silu", latent_channels=4, norm_num_groups=32, use_quant_conv=True,
                        use_post_quant_conv=True, mid_block_add_attention=True)
# Config keys that do not change the network (latent scaling, tiling size, upcasting advice).
_CONFIG_OTHER = ("sample_size", "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast")


def diffusers_key(path: tuple[str, ...]) -> str:
  """Flax param path -> diffusers key: ("decoder", "up_blocks_1", "resnets_0", "norm1", "scale")
  -> "decoder.up_blocks.1.resnets.0.norm1.weight"."""
  parts = []
  for p in path[:-1]:
    m = re.fullmatch(r"(.+)_(\d+)", p)
    parts += [m[1], m[2]] if m else [p]
  return ".".join(parts + ["bias" if path[-1] == "bias" else "weight"])


def torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of a Flax param: HWIO -> OIHW, [in, out] -> [out, in], vectors unchanged."""
  if len(flax_shape) == 4:
    kh, kw, i, o = flax_shape
    return (o, i, kh, kw)
  return tuple(reversed(flax_shape))


def expected_keys(module: AutoencoderKL) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """{diffusers key: (Flax path in params, Flax shape)} for `module` (from `jax.eval_shape`, no compute)."""
  module.check_options()
  f = module.factor
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, f, f, module.in_channels))))
  flat = traverse_util.flatten_dict(layers.unbox(shapes)["params"])
  return {diffusers_key(p): (p, tuple(s.shape)) for p, s in flat.items()}


def _to_flax(a: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray | None:
  """A torch-layout array in Flax layout, or None when its shape does not fit."""
  if len(flax_shape) == 4:
    return a.transpose(2, 3, 1, 0) if a.shape == torch_shape(flax_shape) else None
  if len(flax_shape) == 2:
    out, inp = torch_shape(flax_shape)
    return a.reshape(out, inp).T if a.shape in ((out, inp), (out, inp, 1, 1)) else None
  return a if a.shape == flax_shape else None


def _renamed(state_dict: dict[str, Any]) -> dict[str, Any]:
  """Deprecated attention names renamed (query -> to_q, ..., proj_attn -> to_out.0); ValueError when a
  key is present under both names."""
  out: dict[str, Any] = {}
  for k, v in state_dict.items():
    m = _DEPRECATED_RE.match(k)
    new = f"{m[1]}.{_DEPRECATED[m[2]]}.{m[3]}" if m else k
    if new in out:
      raise ValueError(f"diffusers state dict holds {new!r} twice (under its current and its deprecated name)")
    out[new] = v
  return out


def _some(keys: list[str], n: int = 5) -> str:
  return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _layout_hint(keys) -> str:
  keys = list(keys)
  if any(k.startswith("first_stage_model.") for k in keys):
    return (" The keys carry the 'first_stage_model.' prefix of a full latent-diffusion / Stable Diffusion "
            "checkpoint: extract and convert its VAE to diffusers' layout first (diffusers' conversion scripts).")
  if any(k.startswith(("encoder.down.", "encoder.mid.", "decoder.up.")) for k in keys):
    return (" The keys are in the original CompVis/LDM layout (encoder.down.N.block.M...), not diffusers': "
            "convert with diffusers' scripts/convert_vae_pt_to_diffusers.py first.")
  return ""


def params_from_diffusers(state_dict: dict[str, np.ndarray], module: AutoencoderKL) -> dict:
  """A diffusers `AutoencoderKL` state dict {key: array in torch layout} -> params of `module`: a plain
  nested dict of float32 numpy arrays with the tree of `unbox(module.init(...))["params"]`.

  Raises ValueError naming the missing keys, the unexpected keys (a few, with counts) and every shape
  mismatch (key, expected torch shape, given shape) when the state dict does not fit `module` exactly.
  """
  sd = _renamed(state_dict)
  expected = expected_keys(module)
  missing = sorted(set(expected) - set(sd))
  unexpected = sorted(set(sd) - set(expected))
  bad, flat = [], {}
  for key in sorted(set(expected) & set(sd)):
    path, shape = expected[key]
    a = np.asarray(sd[key])
    if not np.issubdtype(a.dtype, np.floating) and a.dtype.name != "bfloat16":
      bad.append(f"{key}: dtype {a.dtype}, a float tensor expected")
      continue
    w = _to_flax(a, shape)
    if w is None:
      bad.append(f"{key}: expected shape {torch_shape(shape)} (torch layout), got {tuple(a.shape)}")
      continue
    flat[path] = np.ascontiguousarray(w, np.float32)
  if missing or unexpected or bad:
    what = [f"{len(missing)} missing keys ({_some(missing)})" if missing else "",
            f"{len(unexpected)} unexpected keys ({_some(unexpected)})" if unexpected else "",
            f"{len(bad)} mismatched tensors ({_some(bad, 10)})" if bad else ""]
    arch = ", ".join(f"{f}={getattr(module, f)!r}" for f in ARCH_FIELDS)
    raise ValueError(f"diffusers AutoencoderKL weights do not fit AutoencoderKL({arch}): "
                     + "; ".join(w for w in what if w) + "." + _layout_hint(unexpected))
  return traverse_util.unflatten_dict(flat)


def module_from_diffusers_config(config: dict, **kwargs) -> AutoencoderKL:
  """AutoencoderKL from a diffusers `AutoencoderKL` config.json dict (keys it omits take diffusers'
  defaults); `kwargs` set the non-architecture fields (dtype, param_dtype, logvar_clip).

  Refused (ValueError): another `_class_name`, block types other than DownEncoderBlock2D /
  UpDecoderBlock2D, act_fn other than silu, use_quant_conv / use_post_quant_conv False, block type lists
  whose length differs from block_out_channels, and keys this reader does not know.
  """
  name = config.get("_class_name", "AutoencoderKL")
  if name != "AutoencoderKL":
    raise ValueError(f"diffusers config is for {name!r}, not 'AutoencoderKL'")
  known = set(_CONFIG_DEFAULTS) | set(_CONFIG_OTHER)
  unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
  if unknown:
    raise ValueError(f"diffusers AutoencoderKL config has keys this reader does not know: {unknown}; "
                     f"known: {sorted(known)}")
  c = {**_CONFIG_DEFAULTS, **{k: v for k, v in config.items() if k in _CONFIG_DEFAULTS}}
  widths = tuple(int(w) for w in c["block_out_channels"])
  for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
    types = tuple(c[key])
    if any(t != want for t in types) or len(types) != len(widths):
      raise ValueError(f"diffusers AutoencoderKL config: {key}={list(types)} is not supported; only "
                       f"{len(widths)} x {want!r} (one per block_out_channels entry)")
  for key in ("use_quant_conv", "use_post_quant_conv"):
    if not c[key]:
      raise ValueError(f"diffusers AutoencoderKL config: {key}=False (a VAE without that 1x1 conv) is not supported")
  if c["act_fn"] != "silu":
    raise ValueError(f"diffusers AutoencoderKL config: act_fn={c['act_fn']!r} is not supported; only 'silu'")
  return AutoencoderKL(block_out_channels=widths, layers_per_block=int(c["layers_per_block"]),
                       z_channels=int(c["latent_channels"]), in_channels=int(c["in_channels"]),
                       out_channels=int(c["out_channels"]), norm_groups=int(c["norm_num_groups"]),
                       mid_attention=bool(c["mid_block_add_attention"]), **kwargs)


def _folder(path: str) -> tuple[str, list[str]]:
  """A diffusers model folder (or a pipeline folder's vae/) and its file names."""
  names = storage.listdir(path)
  if CONFIG_FILE not in names and "vae" in names:
    path = storage.join(path, "vae")
    names = storage.listdir(path)
  if CONFIG_FILE not in names:
    raise ValueError(f"{path}: a diffusers AutoencoderKL folder needs {CONFIG_FILE}; it holds {names[:10]}")
  return path, names


def diffusers_config(path: str) -> dict:
  """The config.json dict of a diffusers AutoencoderKL folder (or of a pipeline folder's vae/)."""
  folder, _ = _folder(path)
  return storage.read_json(storage.join(folder, CONFIG_FILE))


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{key: array} from a `.safetensors` file or a `torch.save`d state dict (`.bin`, `.pt`, ...)."""
  if str(path).endswith(".safetensors"):
    try:
      from safetensors.numpy import load
    except ImportError:
      raise ImportError(f"reading {path} needs the safetensors package: pip install safetensors") from None
    return dict(load(storage.read_bytes(path)))
  try:
    return torch_pickle.load_state_dict(path)
  except torch_pickle.NotAStateDict as e:
    raise torch_pickle.NotAStateDict(
        f"{e}. (A full latent-diffusion / Stable Diffusion .ckpt, a dict with 'state_dict' and "
        f"'first_stage_model.'-prefixed keys, is not read here: save the VAE in diffusers' layout first.)") from e


def load_diffusers(path: str, module: AutoencoderKL) -> dict:
  """Params of `module` from diffusers AutoencoderKL weights: a `.safetensors` file, a torch state dict
  file, or a diffusers folder (config.json + diffusion_pytorch_model.safetensors or .bin, or a pipeline
  folder holding vae/). A folder's config must describe `module` (ValueError naming the fields that
  differ). See `params_from_diffusers` for the mapping and its errors."""
  if storage.isfile(path):
    return params_from_diffusers(read_state_dict(path), module)
  if not storage.exists(path):
    raise FileNotFoundError(f"diffusers weights {path!r} do not exist")
  folder, names = _folder(path)
  config = storage.read_json(storage.join(folder, CONFIG_FILE))
  described = module_from_diffusers_config(config)
  arch = lambda m, f: tuple(getattr(m, f)) if f == "block_out_channels" else getattr(m, f)  # noqa: E731
  differ = [f"{f}: config {arch(described, f)!r}, module {arch(module, f)!r}" for f in ARCH_FIELDS
            if arch(described, f) != arch(module, f)]
  if differ:
    raise ValueError(f"{folder}/{CONFIG_FILE} describes another AutoencoderKL than the module given: {'; '.join(differ)}")
  for w in WEIGHT_FILES:
    if w in names:
      return params_from_diffusers(read_state_dict(storage.join(folder, w)), module)
  raise ValueError(f"{folder}: no weights file; expected one of {list(WEIGHT_FILES)}, found {names[:10]}")
