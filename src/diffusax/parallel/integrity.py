"""Content checksums and finiteness of a state, in one jitted reduction.

orbax stores no content checksum, so a flipped bit in an array file could
restore silently as different values. Each leaf gets a 64-bit checksum made
of two position-weighted sums of its 32-bit words, modulo 2^32:

    w      = the leaf's bytes as uint32 words (16/8-bit dtypes widened, 64-bit split)
    i      = the word's row-major position, as uint32
    sum_a  = sum_i w_i * (2 i + 1)                       mod 2^32
    sum_b  = sum_i (w_i ^ 0x9E3779B9) * (h(i) | 1)       mod 2^32,  h an integer hash

Integer sums modulo 2^32 are exact and order-free, so the checksum does not
depend on how the array is sharded, on the mesh, or on the number of
processes: every process runs the same jitted reduction over the shards it
holds and all receive the same replicated result (no gathering of arrays on
one host). The weights are odd, so any change confined to one 32-bit word
(a flipped byte or bit) always changes `sum_a`; other corruptions go unseen
with probability about 2^-64. Not cryptographic: it guards against damage,
not against an adversary.

The same call reports, per leaf, whether every value is finite, so the
checkpoint-time NaN guard costs no extra host sync.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

METHOD = "wsum32x2-v1"


def _words(x):
  """The bytes of `x` as a uint32 array (shape may gain a trailing 2 for 64-bit dtypes)."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  size = np.dtype(x.dtype).itemsize
  if x.ndim == 0:
    x = x.reshape(1)
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  if size == 1:
    return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  raise TypeError(f"no checksum for dtype {x.dtype}")


def _position(shape):
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for d in reversed(range(len(shape))):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % 2**32)
    stride *= shape[d]
  return idx


def _hash(i):
  i = (i ^ (i >> 16)) * jnp.uint32(0x45D9F3B)
  i = (i ^ (i >> 16)) * jnp.uint32(0x45D9F3B)
  return i ^ (i >> 16)


def _leaf_audit(x):
  w = _words(x)
  i = _position(w.shape)
  a = jnp.sum(w * (i * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  b = jnp.sum((w ^ jnp.uint32(0x9E3779B9)) * (_hash(i) | jnp.uint32(1)), dtype=jnp.uint32)
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
  return jnp.stack([a, b]), finite


def _audit(tree):
  leaves = jax.tree.leaves(tree)
  sums, finite = zip(*[_leaf_audit(x) for x in leaves]) if leaves else ((), ())
  return jnp.stack(sums), jnp.stack(finite)


def make_audit(replicated_sharding=None):
  """A jitted `audit(tree) -> (checksums uint32 [L, 2], finite bool [L])` over the tree's leaves."""
  kw = {} if replicated_sharding is None else {"out_shardings": (replicated_sharding, replicated_sharding)}
  return jax.jit(_audit, **kw)


def leaf_paths(tree) -> list[str]:
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def audit(tree, audit_fn=None) -> tuple[dict[str, str], list[str]]:
  """({leaf path: 16-hex-digit checksum}, [paths of leaves with non-finite values]) on the host."""
  audit_fn = audit_fn or make_audit()
  sums, finite = audit_fn(tree)
  sums, finite = np.asarray(sums), np.asarray(finite)
  paths = leaf_paths(tree)
  checks = {p: f"{int(s[0]):08x}{int(s[1]):08x}" for p, s in zip(paths, sums)}
  return checks, [p for p, ok in zip(paths, finite) if not ok]



def replica_digests(tree) -> tuple[list[str], np.ndarray]:
  """(paths, uint8 [L, 17]) for the fully replicated leaves of `tree`, from this process' copies.

  Row: a 16-byte BLAKE2 digest of the first local copy, then 1 if every other
  local device holds the same bytes, else 0.
  """
  import hashlib
  paths, rows = [], []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not isinstance(x, jax.Array) or not x.sharding.is_fully_replicated:
      continue
    shards = [np.asarray(jax.random.key_data(s.data) if jnp.issubdtype(s.data.dtype, jax.dtypes.prng_key)
                         else s.data) for s in x.addressable_shards]
    same = all(np.array_equal(s, shards[0]) for s in shards[1:])
    digest = hashlib.blake2b(shards[0].tobytes(), digest_size=16).digest()
    paths.append(jax.tree_util.keystr(path))
    rows.append(np.frombuffer(digest + bytes([same]), np.uint8))
  return paths, np.stack(rows) if rows else np.zeros((0, 17), np.uint8)


def diverged_replicas(tree) -> tuple[int, list[str]]:
  """(number of replicated leaves compared, paths whose copies differ between devices or processes).

  A replicated leaf should be bit-identical on every device: a difference means
  non-deterministic arithmetic or a fault. Collective: every process must call it.
  Costs one device-to-host copy of the replicated leaves.
  """
  paths, rows = replica_digests(tree)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    every = np.asarray(multihost_utils.process_allgather(rows))  # [P, L, 17]
  else:
    every = rows[None]
  bad = [p for i, p in enumerate(paths)
         if not every[:, i, 16].all() or any(not np.array_equal(e[i], every[0, i]) for e in every)]
  return len(paths), bad
