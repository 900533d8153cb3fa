"""rsttrace: explain every TCP reset and listen-queue drop on a Linux host, with eBPF."""
__version__ = "0.1.0"
