"""VMM backends behind one `Vmm` interface (base.py): QEMU over QMP (qemu.py)."""
