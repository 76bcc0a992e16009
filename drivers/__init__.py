"""Hypervisor adapters (OpenStack, VMware, libvirt, simulator). They import nothing of govbroker."""
