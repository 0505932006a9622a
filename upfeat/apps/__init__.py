"""Applications on top of the library; nothing in the library imports them.

- :mod:`~upfeat.apps.cli`: the ``upfeat`` command (typer); ``python -m upfeat`` runs it.
- :mod:`~upfeat.apps.eval_cli`: ``upfeat eval probe|cam``.
- :mod:`~upfeat.apps.implicit_file`: ``upfeat implicit``: fit one image file, save, visualise.
- :mod:`~upfeat.apps.demo_figure`: ``upfeat demo``: the offline demo figure (one PNG).
- :mod:`~upfeat.apps.web_demo`: what the web demo computes (no UI); :mod:`~upfeat.apps.serve`:
  ``upfeat serve``, the Gradio app around it.
- private: :mod:`~upfeat.apps._cli_errors` (the CLI's one error boundary),
  :mod:`~upfeat.apps._cli_options` (options generated from a dataclass),
  :mod:`~upfeat.apps._samples` (where the sample photos are by default).
"""
