"""plato_jax: how alike are the representations of vision and language models, at scale.

Data flows one way: encoders -> store -> search (`plato_jax.knn`) -> metrics -> experiments.
"""
__version__ = "0.1.0"
