"""Where domains come from besides the domains file: libvirt (discovery, monitor, pause)."""
