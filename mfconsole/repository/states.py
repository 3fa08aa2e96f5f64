"""Delivery states. pending → in_flight → delivered | filtered | dead; a dead letter is
then replayed (back to pending, or "replayed" when re-targeted to a new delivery row)
or discarded by an operator."""

PENDING, IN_FLIGHT, DELIVERED, FILTERED, DEAD = "pending", "in_flight", "delivered", "filtered", "dead"
REPLAYED, DISCARDED = "replayed", "discarded"
ACTIVE_STATES = (PENDING, IN_FLIGHT)
FINISHED_STATES = (DELIVERED, FILTERED, REPLAYED, DISCARDED)

# objects.blob of an object whose sealed bytes live in blob_data, not in a file.
INLINE = "inline"
