"""Vulnerability scanning for CI (``make scan``): bandit over the product's code, the installed
Python dependencies against advisory data, and the front end's npm dependencies.

Not part of the product (never installed with it); see docs/security.md, "Vulnerability
scanning".
"""
