"""Pages and plots: render the records other packages compute, never compute them.

* :mod:`~transferkit.report.comparison`  compare's report.html / report.md, tables and plots
* :mod:`~transferkit.report.doctor`      doctor.html, issues.csv; the doctor part of the fit and compare reports
* :mod:`~transferkit.report.ranking`     the backbone ranking's rows, sentences and Pareto chart
* :mod:`~transferkit.report.gallery`     example thumbnails and the mistakes gallery
* :mod:`~transferkit.report.plots`       figures without pyplot, PNG inline
"""
