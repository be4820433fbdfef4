"""containerd-shim-cloudhv: a containerd shim v2 running each pod in a microVM."""
