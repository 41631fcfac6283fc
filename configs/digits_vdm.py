"""VDM on the digits: the continuous-time ELBO with a learned noise schedule (Kingma et al. 2021).

    python -m diffusax.main --config=configs/digits_vdm.py --workdir=runs/digits_vdm
    python -m diffusax.main --config=configs/digits_vdm.py --workdir=runs/digits_vdm --mode=eval

The network, data and training steps are those of configs/digits.py. The loss is the
negative ELBO in bits/dim: 1/2 gamma'(t) ||eps - eps_hat||^2 at t ~ U[0, 1]
(stratified over the batch), plus the prior and the decoder over the digits' 17
values. gamma = -logSNR is a monotone network (positive weights) between two
ends; the ends are trained by the ELBO (they set the prior and decoder terms and
how much of the logSNR range the diffusion term covers) and, with variance
minimisation, the interior is trained to minimise E[L^2], the variance of the
loss, which the ELBO does not depend on (app. I.2). --mode=eval's bpd_vlb is
this bound (bits per 17-level value).

The fixed-schedule baseline of the README's table:
    --config.diffusion.schedule=linear_log_snr --config.diffusion.variance_minimisation=False
"""
from diffusax.programs.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, "digits")
  c.data.levels = 17                       # The digits hold 17 values (0..16): the decoder's bins.
  c.diffusion.schedule = "learned"         # gamma(t): a monotone network between gamma_0 and gamma_1.
  c.diffusion.schedule_kwargs = {"gamma_0": -13.3, "gamma_1": 5.0}  # VDM's ends (its net: 1024 wide, the default).
  c.diffusion.objective = "vdm"            # The continuous-time negative ELBO in bits/dim.
  c.diffusion.variance_minimisation = True  # The schedule's interior minimises the loss variance.
  c.diffusion.learn_endpoints = True       # gamma_0 and gamma_1 trained by the ELBO (from VDM's -13.3 and 5).
  c.diffusion.schedule_lr_factor = 10.0    # Adam moves gamma_0 ~lr per step: 10x lets the ends travel several
                                           # units in 2000 steps (the 17 values need far less SNR_0 than 8 bits).
  c.diffusion.target = "eps"               # VDM's parameterisation.
  c.diffusion.time_sampler = "low_discrepancy"  # t_i = (u + i / B) mod 1 over the batch.
  c.diffusion.t_min = 0.0                  # The integral is over [0, 1].
  c.guidance.label_dropout = 0.1           # Still a CFG model; eval's likelihood uses the null class.
  c.eval.vlb_steps = 64                    # Stratified times per example of the continuous bound.
  return c
