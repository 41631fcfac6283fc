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
from diffusax.programs.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, "digits")
  c.diffusion.schedule = "ddpm_cosine"     # Discrete cosine schedule, T = 1000 (Nichol & Dhariwal 2021).
  c.diffusion.target = "eps"               # The paper's mean parameterisation.
  c.diffusion.time_sampler = "uniform_discrete"
  c.diffusion.objective = "hybrid"         # L_simple + vlb_weight * L_vlb.
  c.diffusion.vlb_weight = 1e-3
  c.model.unet.learn_sigma = True          # 2C output channels: [eps | var_interp].
  c.sample.method = "ddpm"                 # Ancestral sampling with the learned variances,
  c.sample.num_steps = 50                  # respaced to 50 steps,
  c.sample.clip_x0 = 1.0                   # x0_hat clipped to the data range, as in their sampler (an eps model's
                                           # x0_hat is amplified by 1 / alpha(t): 2e4 at t = 1 of this schedule).
  return c
