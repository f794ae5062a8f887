"""How a step runs: the routes a bucket may take, decided when the plan is built, and the loop over them.

- :mod:`~opcomp.step.routes`: which route each bucket takes;
- :mod:`~opcomp.step.fused`: torch's fused AdamW for a bucket whose whole update is AdamW;
- :mod:`~opcomp.step.compiled` and :mod:`~opcomp.step.eager`: element-wise families in place;
- :mod:`~opcomp.step.transactional`: layer statistics and probes, kept whole or not at all;
- :mod:`~opcomp.step.interpreter`: one family's programs, node by node;
- :mod:`~opcomp.step.update`: what an update does to the parameters;
- :mod:`~opcomp.step.runner`: a step, over the routes.
"""
