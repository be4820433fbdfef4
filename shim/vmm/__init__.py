"""VMM backends: one `Vmm` interface, Cloud Hypervisor (REST) and QEMU (QMP)."""
