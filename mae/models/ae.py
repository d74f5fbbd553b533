"""Vanilla autoencoder: encoder to a bottleneck code, symmetric decoder, MSE or binary cross-entropy
(``model.loss``; BCE compares sigmoid outputs with the pixels in [0, 1])."""

from __future__ import annotations

from mae.models.conv import ClassicAutoencoder


class VanillaAutoencoder(ClassicAutoencoder):
    code_activation = "identity"
