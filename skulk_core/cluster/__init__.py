"""The cluster: membership, master election and the replicated state, over any transport."""

from skulk_core.cluster.state import ClusterState, InstanceRecord, LogEntry, NodeRecord, apply

__all__ = ["ClusterState", "InstanceRecord", "LogEntry", "NodeRecord", "apply"]
