"""Fixtures that start (or connect to) the real peers: libvirt's test driver, the vCenter
simulator and the OpenStack services. A peer that cannot start makes its tests error, never skip."""
