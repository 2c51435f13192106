"""big_clip: contrastive image-text pretraining (CLIP, SigLIP, ...) in JAX/Flax NNX."""

import flax

# Shardings are decided explicitly in `big_clip.sharding` from the logical axis names that
# parameters carry (big_vision style: shapes from eval_shape, shardings before init), so a
# model can be built anywhere -- a unit test, a notebook -- without a mesh in context.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"

from big_clip.api import Model, load  # noqa: E402  (after the flax setting above)

__all__ = ["Model", "load", "__version__"]
