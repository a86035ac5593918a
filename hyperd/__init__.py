"""hyperd: the hypervisor."""
