"""An in-process Flower `Grid` for strategy tests (no Ray).

`InProcessGrid` hands every Message to a real `ClientApp` carrying flwr-kd's `KDClient`
handlers, with one `Context` per node as Flower's simulation keeps them. It sets message ids the
way Flower's own grids do, builds replies with `Message(reply_to=...)` (so `src_node_id` is the
replying node), and turns handler exceptions into error replies like Flower's simulation engine.

Optional faults tamper with a node's replies to exercise a strategy's checks: `faults` maps a
node id to a function of the reply, applied to replies of the message types in `fault_types`
(default: `train`, FedDF/HeteroFedAvg's type; FedMD's is `train.fedmd`). A fault that raises
becomes an error reply, as a raising ClientApp would. `faults` may be changed between rounds.

The server-side task identity that Messages need is the `server_task_identity` fixture in
`conftest.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from flwr_kd import protocol

RUN_ID = 7
Fault = Callable[[Message], Message]


def node_id_of(partition_id: int) -> int:
    """Node ids unlike partition ids, so that mixing the two up shows."""
    return 1000 + 17 * partition_id


class InProcessGrid(Grid):
    def __init__(
        self,
        app: ClientApp,
        num_nodes: int,
        run_config: dict | None = None,
        node_configs: dict[int, dict] | None = None,
        faults: dict[int, Fault] | None = None,
        fault_types: Collection[str] = (protocol.TRAIN,),
    ) -> None:
        self.app = app
        self.contexts: dict[int, Context] = {}
        for pid in range(num_nodes):
            node_config = {"partition-id": pid, "num-partitions": num_nodes}
            node_config.update((node_configs or {}).get(pid, {}))
            node = node_id_of(pid)
            self.contexts[node] = Context(
                run_id=RUN_ID,
                node_id=node,
                node_config=node_config,
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
        self.faults = dict(faults or {})  # node id -> tampering of its replies
        self.fault_types = set(fault_types)  # message types whose replies faults tamper with
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._pending: dict[str, Message] = {}
        self._run = Run.create_empty(run_id=RUN_ID)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            assert msg.metadata.dst_node_id in self.contexts, "message to an unknown node"
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do
            self.sent.append(msg)
            self._pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = [self._deliver(self._pending.pop(mid)) for mid in list(message_ids)]
        self.replies.extend(out)
        return out

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        try:
            reply = self.app(msg, self.contexts[node])
            if msg.metadata.message_type in self.fault_types and node in self.faults:
                reply = self.faults[node](reply)
        except Exception as exc:  # noqa: BLE001 - what Flower's simulation engine does
            reason = f"{type(exc)}:<'{exc}'>"
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
            )
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        return reply

    def messages_of(self, message_type: str) -> list[Message]:
        return [m for m in self.sent if m.metadata.message_type == message_type]

    def replies_of(self, message_type: str) -> list[Message]:
        return [m for m in self.replies if m.metadata.message_type == message_type]

    def train_messages(self) -> list[Message]:
        return self.messages_of(protocol.TRAIN)

    def train_replies(self) -> list[Message]:
        return self.replies_of(protocol.TRAIN)
