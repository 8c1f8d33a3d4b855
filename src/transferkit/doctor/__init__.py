"""The data doctor: label issues, near-duplicates and leakage, outliers, as findings with reasons.

* :mod:`~transferkit.doctor.diagnose`     the library call: data -> backbone -> cached features -> findings
* :mod:`~transferkit.doctor.findings`     Diagnosis / Finding: out-of-fold probes, confident learning, pairs, outliers
* :mod:`~transferkit.doctor.label_issues` confident learning (Northcutt et al. 2021) on out-of-fold probabilities
* :mod:`~transferkit.doctor.pairs`        near-duplicates and leakage in feature space
* :mod:`~transferkit.doctor.outliers`     examples far from every neighbour of their class
* :mod:`~transferkit.doctor.near_copies`  near-copies in input space (thumbnails, text 3-grams)

The pages (doctor.html, issues.csv) are rendered by :mod:`transferkit.report.doctor`.
"""
