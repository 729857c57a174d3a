"""Names shared by strategies and clients: message types and record keys."""

#: Message types (Flower requires train / evaluate / query, optionally `.<action>`).
DESCRIBE = "query.architecture"
TRAIN = "train"
EVALUATE = "evaluate"
FEDMD_ROUND = "train.fedmd"

#: Record keys inside a Message's RecordDict.
ARRAYS = "arrays"  # model weights (one architecture)
CONFIG = "config"
METRICS = "metrics"
PUBLIC = "public"  # the round's public inputs, key "x"
LOGITS = "logits"  # logits on the public inputs, key "logits"
CONSENSUS = "consensus"  # FedMD: previous round's consensus logits, keys "x", "logits"
