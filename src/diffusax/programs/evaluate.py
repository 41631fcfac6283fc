"""The evaluation program (`--mode=eval`): metrics of a checkpoint's EMA params, as JSON and TensorBoard.

    python -m diffusax.main --config=configs/digits.py --workdir=runs/digits --mode=eval \
        --config.sample.guidance_scale=2

Metrics (eval.metrics):
  fd, kid          Fréchet distance and KID of eval.num_samples generated samples against real
                   data, on the dataset's own classifier's features (embedded digits: half A of
                   the real digits as reference, half B's distance to A as the real-data baseline;
                   embedded photos/photos64: halves of the test crops; `fd_<kind>`, `kid_<kind>`) or on
                   Inception-v3 pool features (eval.inception_weights; reference: the eval split);
  class_accuracy   the share of class-conditional samples the classifier assigns to their label;
  bpd_vlb          bits/dim by the discrete VLB (core.likelihood; discretised decoder for 8-bit data);
  bpd_ode          bits/dim by the PF-ODE with Hutchinson's trace and uniform dequantisation.
Likelihoods use the first eval.bpd_examples of data.eval_split, without labels (the null class of a
CFG-trained model). Samples come from the resumable sampling job (WORKDIR/eval/samples_...), so an
interrupted evaluation reuses the finished shards. Results go to WORKDIR/eval/eval_<step>.json (the latest
evaluation of that step) and, for sample metrics, to eval.json in the samples' directory (one per sampler setting).
"""
from __future__ import annotations

import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusax import storage
from diffusax.core import likelihood
from diffusax.data import pipeline, registry
from diffusax.evaluation import distances
from diffusax.programs import setup as setup_lib
from diffusax.programs import setup_task
from diffusax.programs.logs import Logger
from diffusax.programs.settings import ConfigError, Settings
from diffusax.sampling import job as job_lib


def _digits_classifier():
  from diffusax.evaluation import digits_classifier  # Deferred: only evaluations of the digits need it.
  return digits_classifier


def _photos_classifier():
  from diffusax.evaluation import photos_classifier
  return photos_classifier


# An embedded dataset's own fd/kid features (data.registry `features`) -> its classifier module:
# load_or_train(data_dir, log) -> (params, info), apply(params, x) -> (logits, features),
# real_halves(data_dir, name=) -> two disjoint halves of real images (reference A, baseline B).
CLASSIFIERS = {"digits": _digits_classifier, "photos": _photos_classifier}


def feature_kind(s: Settings, data) -> str:
  """The fd/kid features: eval.features, or with "auto" the dataset's own (data.registry), else Inception.

  `data`: the dataset's `data.registry.Description`.
  """
  kind = s.eval.features
  own = data.features or "inception"
  if kind == "auto":
    kind = own
  if kind != "inception" and kind != own:
    have = [n for n, e in registry.EMBEDDED.items() if e.features == kind]
    raise ConfigError(f"eval.features={kind!r} needs data.name in {have}, got {s.data.name!r}")
  if kind == "inception" and not s.eval.inception_weights:
    raise ConfigError("fd/kid on this dataset need Inception features: set eval.inception_weights to the FID "
                      "Inception weights file (pt_inception-2015-12-05-6726825d.pth), or drop fd/kid from "
                      "eval.metrics")
  return kind


class Evaluator:
  """The metrics of eval.metrics for any number of parameter sets of one `setup.ModelSetup`.

  Everything that does not depend on the parameters is built on first use and
  kept: the jitted sampler and likelihood functions (parameters are their
  arguments, so a second evaluation neither retraces nor recompiles), the
  feature network, the real-data reference features and the held-out
  examples. The training program holds one for its whole run (its caller
  passes `Evaluator` as train.train_and_evaluate's `evaluator`). Tracings are
  counted in `traces` ("eval_sample", "eval_bpd_vlb", "eval_bpd_ode").
  Construction refuses settings evaluation cannot run with (`check`).
  """

  def __init__(self, u: setup_lib.ModelSetup, traces: setup_lib.TraceCounts | None = None,
               guide: setup_lib.GuideModel | None = None, base=None):
    check(u.s, u.data)
    self.u = u
    self.guide = guide  # Autoguidance's guiding model for the samples (setup.restore_guide), or None.
    self.base = base    # A cascade's base stage (setup_task.restore_base), or None.
    self.traces = setup_lib.TraceCounts() if traces is None else traces
    self._cache: dict[str, object] = {}

  def _once(self, name: str, build):
    if name not in self._cache:
      self._cache[name] = build()
    return self._cache[name]

  # -- samples: fd, kid, class accuracy ----------------------------------------------------------

  def _classifier(self, logger: Logger):
    """(module, params, info) of the dataset's own classifier (trained and cached in the data dir on first use)."""
    mod = CLASSIFIERS[self.u.data.features]()
    return self._once("classifier", lambda: (mod, *mod.load_or_train(self.u.s.data.data_dir, log=logger.info)))

  def _own_reference(self, logger: Logger):
    """Classifier features of the real halves A and B."""
    def build():
      mod, cparams, _ = self._classifier(logger)
      half_a, half_b = mod.real_halves(self.u.s.data.data_dir, name=self.u.s.data.name)
      return mod.apply(cparams, half_a)[1], mod.apply(cparams, half_b)[1]
    return self._once("own_reference", build)

  def _inception_reference(self):
    """(the FID Inception network, its pool features of the real eval split)."""
    from diffusax.evaluation import inception
    def build():
      s = self.u.s
      net = inception.load_fid_inception(s.eval.inception_weights)
      return net, net.pool_features(_real_images(s, s.data.eval_split or s.data.split))
    return self._once("inception_reference", build)

  def _sample_metrics(self, params, step: int, workdir: str, logger: Logger) -> tuple[dict, dict]:
    u, s, ev = self.u, self.u.s, self.u.s.eval
    spec = setup_lib.job_spec(u, step, num_samples=ev.num_samples, guide=self.guide, base=self.base)
    out_dir = storage.join(workdir, "eval", storage.basename(setup_lib.default_out_dir(workdir, spec))
                           + f"_n{spec.num_samples}")
    # The sample function depends on the sampler settings, not on the checkpoint step.
    fn = self._once("sample_fn", lambda: self.traces.wrap("eval_sample", setup_lib.job_fn(u, spec, self.guide,
                                                                                         self.base)))
    setup_lib.run_sample_job(u, params, spec, out_dir, logger, sample_fn=fn, guide=self.guide, base=self.base)
    gen = job_lib.load(out_dir)
    m, extra = {}, {"samples_dir": out_dir}
    want = set(ev.metrics)
    kind = feature_kind(s, u.data) if want & {"fd", "kid"} else None
    own = u.data.features
    if own in CLASSIFIERS and (kind == own or "class_accuracy" in want):
      # The dataset's own classifier: features for fd/kid, predictions for class accuracy.
      mod, cparams, info = self._classifier(logger)
      extra["classifier"] = {k: info[k] for k in ("version", "seed", "steps", "test_accuracy")}
      logits, feats = mod.apply(cparams, gen["samples"])
      if "class_accuracy" in want and spec.num_classes:
        m["class_accuracy"] = float(np.mean(np.argmax(logits, -1) == gen["labels"]))
    if kind in CLASSIFIERS:
      fa, fb = self._own_reference(logger)
      if "fd" in want:
        m[f"fd_{kind}"] = distances.frechet_distance_from_features(feats, fa)
        m[f"fd_{kind}_real_baseline"] = distances.frechet_distance_from_features(fb, fa)
      if "kid" in want:
        m[f"kid_{kind}"] = distances.kid(feats, fa, subset_size=ev.kid_subset_size)[0]
        m[f"kid_{kind}_real_baseline"] = distances.kid(fb, fa, subset_size=ev.kid_subset_size)[0]
    elif kind == "inception":
      net, fr = self._inception_reference()
      fg = net.pool_features(gen["samples"])
      if "fd" in want:
        m["fid"] = distances.frechet_distance_from_features(fg, fr)
      if "kid" in want:
        m["kid"] = distances.kid(fg, fr, subset_size=ev.kid_subset_size)[0]
    return m, extra

  def _reconstruction(self, logger: Logger) -> dict:
    from diffusax.programs import setup_latent
    u, lat = self.u, self.u.latent
    return setup_latent.reconstruction_metrics(u.s, lat.module, u.mesh, setup_latent.reconstruct_fn(lat.module),
                                               lat.params(u.mesh, logger.info), u.data.features, logger)

  # -- likelihood: bpd_vlb, bpd_ode --------------------------------------------------------------

  def _likelihood(self):
    """Held-out inputs, fixed keys and jitted (params, x, key) -> per-example nats functions."""
    def build():
      u, s, ev = self.u, self.u.s, self.u.s.eval
      from diffusax.nn import bridge
      data = _real_images(s, s.data.eval_split or s.data.split, ev.bpd_examples)
      is_8bit = data.dtype == np.uint8
      levels = s.data.levels
      null = s.loss.null_class
      cond = None if null is None else jnp.full((len(data),), null, jnp.int32)
      target, sched = s.loss.target, u.schedule
      t_max = likelihood.ode_default_t_max(sched, target)
      key = jax.random.fold_in(jax.random.key(s.sample.seed), 0xB9D)
      grid = (likelihood.ddpm_grid(sched) if hasattr(sched, "num_steps")
              else likelihood.ode_time_grid(sched, ev.vlb_steps, ev.t_min, t_max))

      def vlb(params, x, k):
        model = bridge.model(u.module, {"params": params}, target, sched)
        if s.loss.objective == "vdm":  # The bound it was trained on: continuous in t, over data.levels values.
          return likelihood.vdm_elbo(model, x, k, cond=cond, num_t=ev.vlb_steps, levels=levels)
        return likelihood.vlb_terms(model, x, k, grid, cond=cond, decoder="discretized" if is_8bit else "gaussian",
                                    num_bins=levels)["total"]

      def nll_ode(params, x, k):
        model = bridge.model(u.module, {"params": params}, target, sched)
        return likelihood.ode_log_likelihood(model, x, k, cond=cond, num_steps=ev.ode_steps, solver=ev.ode_solver,
                                             divergence=ev.hutchinson, t_min=ev.t_min, t_max=t_max)[0]

      k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
      # Discrete data on data.levels values: the likelihoods are of the values' exact grid (the bound holds
      # for them whatever the stored 8-bit approximation), and dequantisation fills each value's bin.
      return {"d": int(np.prod(data.shape[1:])), "is_8bit": is_8bit, "levels": levels,
              "vlb": (jax.jit(self.traces.wrap("eval_bpd_vlb", vlb)),
                      likelihood.on_grid(data, levels) if is_8bit else jnp.asarray(data, jnp.float32),
                      jax.random.fold_in(key, 0)),
              "ode": (jax.jit(self.traces.wrap("eval_bpd_ode", nll_ode)),
                      likelihood.dequantize(data, k1, levels) if is_8bit else jnp.asarray(data, jnp.float32), k2)}
    return self._once("likelihood", build)

  def _likelihood_metrics(self, params) -> dict:
    ev, lk = self.u.s.eval, self._likelihood()
    m = {}
    if "bpd_vlb" in ev.metrics:
      fn, x, k = lk["vlb"]
      m["bpd_vlb"] = float(jnp.mean(likelihood.bits_per_dim(fn(params, x, k), lk["d"])))
    if "bpd_ode" in ev.metrics:
      fn, x, k = lk["ode"]
      m["bpd_ode"] = float(jnp.mean(likelihood.bits_per_dim(-fn(params, x, k), lk["d"], dequantized=lk["is_8bit"],
                                                            levels=lk["levels"])))
    return m

  def evaluate(self, params, step: int, workdir: str, logger: Logger) -> dict:
    """Every metric of eval.metrics for `params`; writes WORKDIR/eval/eval_<step>.json (and
    eval.json beside the samples) and TensorBoard scalars."""
    s, ev = self.u.s, self.u.s.eval
    t0 = time.perf_counter()
    metrics, extra = {}, {}
    if set(ev.metrics) & {"fd", "kid", "class_accuracy"}:
      m, extra = self._sample_metrics(params, step, workdir, logger)
      metrics.update(m)
    if set(ev.metrics) & {"bpd_vlb", "bpd_ode"}:
      metrics.update(self._likelihood_metrics(params))
    if self.u.latent is not None:  # The autoencoder's own share of the error: its reconstructions.
      extra["reconstruction"] = self._once("reconstruction", lambda: self._reconstruction(logger))
      extra["autoencoder"] = self.u.latent.tag
    result = {"step": step, "metrics": metrics, "num_samples": ev.num_samples,
              "sampler": {"method": s.sample.method, "num_steps": s.sample.num_steps,
                          "guidance_scale": s.sample.guidance_scale, "eta": s.sample.eta, "seed": s.sample.seed,
                          "guidance": f"autoguidance by {self.guide.tag}" if self.guide is not None else "cfg",
                          "guidance_interval": list(s.sample.guidance_interval),
                          "spacing": s.sample.spacing or "default", "order": s.sample.order},
              "likelihood": {"examples": ev.bpd_examples, "split": s.data.eval_split or s.data.split,
                             "levels": s.data.levels,
                             "bound": "vdm_continuous" if s.loss.objective == "vdm" else "discrete_vlb",
                             "vlb_steps": ev.vlb_steps, "ode_steps": ev.ode_steps, "ode_solver": ev.ode_solver,
                             "hutchinson": ev.hutchinson, "t_min": ev.t_min},
              "seconds": round(time.perf_counter() - t0, 1), **extra}
    if jax.process_index() == 0:
      blob = json.dumps(result, indent=1).encode()
      path = storage.join(workdir, "eval", f"eval_{step:07d}.json")
      storage.commit(path, blob, marker=False)
      if extra.get("samples_dir"):  # Each sampler setting keeps its own result beside its samples.
        storage.commit(storage.join(extra["samples_dir"], "eval.json"), blob, marker=False)
      result["path"] = path
    logger.scalars({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}, step)
    logger.info(f"eval at step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return result


def _real_images(s: Settings, split: str, limit: int | None = None) -> np.ndarray:
  try:
    src = pipeline.open_source(s.data.name, split, s.data.data_dir)
  except pipeline.DataError as e:  # Other failures keep their own type and traceback.
    raise ConfigError(f"eval: {e}") from None
  n = len(src) if limit is None else min(limit, len(src))
  return pipeline.eval_images(src, n, s.data.image_size)



def check(s: Settings, data) -> None:
  """Refuses settings evaluation cannot run with (e.g. fd/kid without features) before any device work."""
  if set(s.eval.metrics) & {"fd", "kid"}:
    feature_kind(s, data)
  bpd = sorted(set(s.eval.metrics) & {"bpd_vlb", "bpd_ode"})
  if bpd and data.transform == "latent":
    raise ConfigError(f"eval.metrics {bpd}: bits/dim are not defined for a latent diffusion model (its likelihood "
                      "is of latents, not of pixels); use fd, kid and class_accuracy")
  if bpd and s.task.enabled:
    raise ConfigError(f"eval.metrics {bpd}: the bits/dim evaluation is unconditional; a {s.task.name} model's "
                      "likelihood is conditional on its image: use fd, kid and class_accuracy")


def run(s: Settings, workdir: str, devices=None, traces: setup_lib.TraceCounts | None = None) -> dict:
  """Evaluates the first EMA of a checkpoint; reads only those parameters and the eval data."""
  setup_lib.check_guide(s)
  u = setup_lib.model_setup(s, devices)
  Evaluator(u, traces)  # Refuses a missing weights file before loading anything.
  logger = Logger(workdir, enabled=jax.process_index() == 0)
  try:
    base = setup_task.restore_base(u, logger) if u.s.task.enabled else None
    evaluator = Evaluator(u, traces, guide=setup_lib.restore_guide(u, logger), base=base)
    params, step = setup_lib.restore_ema(u, workdir, u.s.sample.checkpoint_step, logger)
    return evaluator.evaluate(params, step, workdir, logger)
  finally:
    logger.close()
