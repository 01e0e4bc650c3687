"""Embeddings of a whole dataset: the teacher-embedding cache and ``timmface embed``'s output files.

* :mod:`timmface.embedding.cache`: the ``.tfemb`` file format (header, fingerprints, ``done`` flags) and
  :class:`~timmface.embedding.cache.EmbeddingCache`, its memory-mapped reader. Distillation needs only this.
* :mod:`timmface.embedding.engine`: runs a model over a dataset in batches and fills such a file,
  resumably (:func:`~timmface.embedding.engine.build_cache`, :func:`~timmface.embedding.engine.embed_to_file`).
* :mod:`timmface.embedding.files`: plain ``.safetensors`` / ``.npy`` embedding files (write and read).

Imports flow one way: ``engine`` -> ``files`` -> ``cache``. This package imports nothing eagerly, so
``import timmface.embedding.cache`` does not pull in the engine.
"""
