"""Running a model on real images: plan, tile, batch, write.

- :mod:`~upfeat.inference.memory`: byte estimates of a run; reading and printing budgets.
- :mod:`~upfeat.inference.planning`: the one place a run is planned: tiles for each stage under
  a memory budget (:func:`~upfeat.inference.planning.plan_memory`).
- :mod:`~upfeat.inference.tiled`: tiled execution of a plan (backbone, then upsampler).
- :mod:`~upfeat.inference.jobs`: the work list of a batch run (inputs -> output paths).
- :mod:`~upfeat.inference.featfile`: feature files, written atomically and streamed to disk.
- :mod:`~upfeat.inference.batch`: batch feature extraction (what ``upfeat upsample`` runs).

Dependencies point one way: memory <- planning <- tiled <- batch; jobs <- batch; featfile <-
batch. :meth:`upfeat.UpFeat.upsample` uses planning and tiled; batch builds models with
:func:`upfeat.create_model`.
"""
