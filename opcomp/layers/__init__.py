"""Layers whose statistics opcomp captures: what each kind computes, the one record of a layer
running a layer node, and the statistics of a step.

- :mod:`~opcomp.layers.kinds`: one helper per kind of layer (Linear, Conv1D, Conv2d, Embedding),
  chosen through one registry;
- :mod:`~opcomp.layers.record`: :class:`~opcomp.layers.record.Layer`, from build to kernel;
- :mod:`~opcomp.layers.samples`: a micro-batch as rows of A and G;
- :mod:`~opcomp.layers.statistics`: A, G, their diagonals, EKFAC's correction, pooled over ranks;
- :mod:`~opcomp.layers.shapes`: the shapes of a layer's buffers.
"""
