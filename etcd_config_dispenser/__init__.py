"""etcd-config-dispenser: etcd keys -> atomic snapshot on disk -> signal to a child."""

__version__ = "0.1.0"
