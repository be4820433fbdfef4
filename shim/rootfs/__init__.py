"""A container's root filesystem: from containerd's rootfs mounts to a disk in the guest."""
