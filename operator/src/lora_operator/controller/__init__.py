"""The operator's controller: pure reconcile decisions (reconcile.py, spec_checks.py,
settings.py) and the thin kopf handlers and API adapter around them (handlers.py, kube.py).
"""
