"""The run directory: what a fit leaves on disk, how it loads back, its model card and the Hub.

* :mod:`~transferkit.runs.directory`  save/load through the backbone contract, transferkit.json, versions
* :mod:`~transferkit.runs.hubfiles`   timm's config.json and the model card, written into the run's staging folder
* :mod:`~transferkit.runs.card`       README.md in the Hub's format, metrics with intervals, usage
* :mod:`~transferkit.runs.hub`        push a run to the Hugging Face Hub
"""
