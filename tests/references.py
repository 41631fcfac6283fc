"""Independent numpy (float64) references: the papers' closed forms, never diffusax code.

Schedules return (alpha(t), sigma(t)):
  VP linear  Song et al. 2021, eq. 33: log alpha = -t^2 (b1 - b0) / 4 - t b0 / 2
  VP cosine  Nichol & Dhariwal 2021, eq. 17: alpha^2 = f(t) / f(0), f(u) = cos((u + s)/(1 + s) pi/2)^2
  VE         Song et al. 2021, eq. 31: sigma = smin (smax / smin)^t, alpha = 1
  flow       rectified flow: alpha = 1 - t, sigma = t
"""
import numpy as np


def np_vp_linear(t, b0=0.1, b1=20.0):
  a = np.exp(-0.25 * t**2 * (b1 - b0) - 0.5 * t * b0)
  return a, np.sqrt(1.0 - a**2)


def np_vp_cosine(t, s=0.008):
  f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
  abar = f(t) / f(0.0)
  return np.sqrt(abar), np.sqrt(1.0 - abar)


def np_ve(t, smin=0.01, smax=50.0):
  return np.ones_like(t), smin * (smax / smin) ** t


def np_flow(t):
  return 1.0 - t, t


def np_log_snr(ref, t):
  a, s = ref(t)
  return np.log(a**2) - np.log(s**2)


def np_coefficients(ref, t, h=1e-6):
  """(alpha, sigma, d alpha/dt, d sigma/dt) with central differences in float64."""
  a, s = ref(t)
  ap, sp = ref(t + h)
  am, sm = ref(t - h)
  return a, s, (ap - am) / (2 * h), (sp - sm) / (2 * h)


def np_targets(x0, eps, a, s, da, ds):
  """Each target's value from (x0, eps); coefficients are [B] expanded over [B, D]."""
  a, s, da, ds = (c[:, None] for c in (a, s, da, ds))
  return {"eps": eps, "x0": x0, "v": a * eps - s * x0, "score": -eps / s, "flow": da * x0 + ds * eps}
