"""Delivery states. pending → in_flight → delivered | filtered | dead
(delivered → committed where the destination asks for Storage Commitment); a dead letter is
then replayed (back to pending, or "replayed" when re-targeted to a new delivery row)
or discarded by an operator. A delivery to a destination with trigger = "study_stable"
starts as held (waiting for its study to be quiet, see engine/holds.py) and becomes
pending, with the rest of its study, when the study is released."""

HELD = "held"
PENDING, IN_FLIGHT, DELIVERED, FILTERED, DEAD = "pending", "in_flight", "delivered", "filtered", "dead"
REPLAYED, DISCARDED = "replayed", "discarded"
ACTIVE_STATES = (HELD, PENDING, IN_FLIGHT)     # queued, not yet settled
# Storage Commitment (dimse destinations with storage_commitment): the PACS confirmed
# custody (N-EVENT-REPORT). A delivered delivery awaiting it carries commit_state.
COMMITTED = "committed"
FINISHED_STATES = (DELIVERED, FILTERED, REPLAYED, DISCARDED, COMMITTED)
# deliveries.commit_state: to be requested / under a transaction (commit_txn).
COMMIT_AWAITING, COMMIT_REQUESTED = "awaiting", "requested"

# objects.blob of an object whose sealed bytes live in blob_data, not in a file.
INLINE = "inline"
