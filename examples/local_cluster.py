"""Start a three-node Skulk cluster on loopback, print `skulk status`, and stop it.

    .venv/bin/python examples/local_cluster.py [--keep]

Each node gets its own data dir and ports; the second joins the first and the third joins the
second (a chain), and the mesh forms by itself. With --keep the nodes run until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from skulk_core.testing import SkulkProcess, find_free_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the nodes running until Ctrl-C")
    args = parser.parse_args()
    env = {"SKULK_CLUSTER_KEY": os.environ.get("SKULK_CLUSTER_KEY", "example-cluster-key"), "SKULK_SERVE_ENABLED": "false"}
    root = Path(tempfile.mkdtemp(prefix="skulk-cluster-"))
    ports = [find_free_port() for _ in range(3)]
    nodes = []
    for i, port in enumerate(ports):
        node_args = ["--no-autoload", "--plugin", "tcp", "--transport-host", "127.0.0.1", "--transport-port", str(port), "--no-discovery", "--node-name", f"node-{i}"]
        if i:
            node_args += ["--peer", f"127.0.0.1:{ports[i - 1]}"]
        nodes.append(SkulkProcess(root / f"node-{i}", args=node_args, env=env).start())
    try:
        for node in nodes:
            node.wait_ready(60)
        nodes[0].wait_for(lambda: len(nodes[0].get("/state")["nodes"]) == 3, 20, "three nodes")  # type: ignore[index]
        subprocess.run([sys.executable, "-m", "skulk_core", "status", "--api", nodes[0].url], check=True)
        if args.keep:
            print(f"APIs: {', '.join(n.url for n in nodes)}; Ctrl-C to stop")
            while True:
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for node in nodes:
            node.stop()
        print(f"logs under {root}")


if __name__ == "__main__":
    main()
