"""Improved DDPM on the digits: learned variances trained by L_hybrid, fast ancestral sampling.

    python -m diffusax.main --config=configs/digits_iddpm.py --workdir=runs/digits_iddpm
    python -m diffusax.main --config=configs/digits_iddpm.py --workdir=runs/digits_iddpm --mode=eval

Nichol & Dhariwal (2021): the network predicts eps and, in C more channels, where
its step variance lies between beta and beta_tilde (eq. 15); L_hybrid = L_simple +
0.001 L_vlb trains the variance through the VLB (the mean's gradient stopped).
With learned variances the ancestral DDPM sampler works with few steps (here 50
of the schedule's 1000), and --mode=eval's VLB uses them. The network, data and
training steps are those of configs/digits.py.
"""
import importlib.util
import os


def _digits():
  spec = importlib.util.spec_from_file_location("diffusax_configs_digits",
                                                os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  c = _digits().get_config()
  c.diffusion.schedule = "ddpm_cosine"     # Discrete cosine schedule, T = 1000 (Nichol & Dhariwal 2021).
  c.diffusion.target = "eps"               # The paper's mean parameterisation.
  c.diffusion.time_sampler = "uniform_discrete"
  c.diffusion.objective = "hybrid"         # L_simple + vlb_weight * L_vlb.
  c.diffusion.vlb_weight = 1e-3
  c.model.unet.learn_sigma = True          # 2C output channels: [eps | var_interp].
  c.sample.method = "ddpm"                 # Ancestral sampling with the learned variances,
  c.sample.num_steps = 50                  # respaced to 50 steps.
  return c
