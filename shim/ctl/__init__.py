"""`cloudhvctl`: the operator's view of the host (pods, consoles, the image cache, a
self-check) and the installer's probe boot.

Nothing here is imported by the shim itself: `start` and the pod daemons stay free
of `rich` and of everything else only an operator needs (tests/unit/test_ctl.py
checks the import graph).
"""
