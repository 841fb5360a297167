"""Loss functions (pure functions of tensors) and the phase-aware objective."""

from distilflow.losses.features import cosine_distance, normalized_mse
from distilflow.losses.logits import cross_entropy_sum, forward_kl, generalized_jsd, reverse_kl

__all__ = ["cosine_distance", "cross_entropy_sum", "forward_kl", "generalized_jsd", "normalized_mse", "reverse_kl"]
