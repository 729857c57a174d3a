"""The `train.fedmd` messages of one FedMD round, one per connected node.

Each carries the run's client settings with the node's header (`FedMDRoundConfig`), the public
subset its logits must be on, and the phase's records: its architecture's pretrained weights at
init, the previous consensus afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from flwr_kd import protocol
from flwr_kd.configs import FedMDRoundConfig


def round_messages(
    participants: dict[int, str],
    settings: FedMDRoundConfig,
    config: ConfigRecord,
    server_round: int,
    next_subset: np.ndarray,
    records_for: Callable[[str], dict[str, ArrayRecord]],
    phase: str,
) -> list[Message]:
    """One message per `{node: arch}` of `participants`, asking for logits on `next_subset`
    (round `server_round + 1`'s), with `records_for(arch)`."""
    subset = ArrayRecord({"indices": Array(next_subset)})
    messages = []
    for node, arch in participants.items():
        header = replace(
            settings,
            arch=arch,
            phase=phase,
            server_round=server_round,
            subset_round=server_round + 1,
        )
        content = RecordDict(
            {
                protocol.CONFIG: ConfigRecord({**dict(config), **header.to_config()}),
                protocol.PUBLIC: subset,
                **records_for(arch),
            }
        )
        messages.append(Message(content, dst_node_id=node, message_type=protocol.FEDMD_ROUND))
    return messages
