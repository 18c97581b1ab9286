"""skulk-tcp: Skulk's TCP transport (entry point ``tcp`` in the ``skulk`` group).

Authenticated links carrying messages and flow-controlled byte streams on one socket per peer,
optional TLS, and authenticated UDP discovery on the LAN. See docs/transport-tcp.md.
"""

from skulk_tcp.connection import TcpByteStream, TcpConnection
from skulk_tcp.settings import TcpSettings
from skulk_tcp.transport import TcpTransport

__version__ = "0.1.0"

__all__ = ["TcpByteStream", "TcpConnection", "TcpSettings", "TcpTransport", "__version__"]
