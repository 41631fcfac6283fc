"""Evaluation: feature distances, the digits and photos evaluation classifiers, Inception-v3 features.

  distances          Fréchet distance and KID from any [N, D] features
  digits_classifier  a small classifier for the embedded 8x8 digits (features + class accuracy)
  photos_classifier  the same for the embedded RGB photos (32x32; photos64 reduced to 32x32)
  inception          the FID Inception-v3 network in Flax and its weight converter
  lpips              LPIPS (VGG-16, v0.1) in Flax from torch-free weights: the autoencoder's perceptual term
  reconstruction     PSNR, SSIM and reconstruction FD of an autoencoder, and the bicubic baseline

Both likelihood routes (VLB and probability-flow ODE bits/dim) are pure JAX in `diffusax.core.likelihood`.
"""
