"""Evaluation: feature distances, the digits evaluation classifier, likelihoods, Inception-v3 features.

  distances          Fréchet distance and KID from any [N, D] features
  digits_classifier  a small classifier for the embedded 8x8 digits (features + class accuracy)
  ode_likelihood     bits/dim by the probability-flow ODE (Hutchinson trace), with dequantisation
  inception          the FID Inception-v3 network in Flax and its weight converter
"""
