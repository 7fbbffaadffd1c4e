"""Every Redis key and channel the service uses, in one place (API, worker and tests read them from here).

The job stream and its consumer group are settings (PHA_JOB_STREAM, PHA_JOB_GROUP); everything else is fixed.
"""

from __future__ import annotations

JOB_KEY = "pha:job:{}"  # hash: one /adapt job's state, progress and result
ADAPTER_PREFIX = "pha:adapter"  # string per cached adapter set: pha:adapter:<model>:<task>:<prototype version>
REGISTRY_CHANNEL = "pha:registry"  # pub/sub: "a registry change was committed" (payload: its sequence number)
REGISTRY_TASK = "pha:registry:task:{}"  # hash per task (redis registry store): seq, job_id, record, tensors, digest
REGISTRY_LOG = "pha:registry:log"  # sorted set: task name -> seq of its latest change (tombstones included)
REGISTRY_HEAD = "pha:registry:head"  # counter: seq of the last change
