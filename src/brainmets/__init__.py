"""brainmets: patient-level detection of brain metastases on head CT."""

__version__ = "0.1.0"

# Messages about one process's own state (not the config, weights or reduced gradients that
# every torchrun rank shares): printed by every rank, where other warnings come from rank 0.
PER_RANK_LOGGER = "brainmets.per_rank"
