"""The alpha sweep: candidates -> generation -> reward scoring -> report.

Builds candidates with the `expo` method's own code (mergekit_expo), never a copy.
"""
