"""diffusax: functional diffusion models in JAX.

`diffusax.core` is the pure-JAX math (no Flax); `diffusax.nn` the Flax networks;
`diffusax.programs` the training / sampling / evaluation programs. Importing this
package imports nothing heavy: import the subpackage you need.
"""
__version__ = "0.1.0"
