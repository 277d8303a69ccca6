"""What unprivileged callers import: request sockets from the broker, as a Lease."""

from broker.errors import BrokerError
from client.lease import Lease
from client.sync import Client, request

__all__ = ["BrokerError", "Client", "Lease", "request"]
