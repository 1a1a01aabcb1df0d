"""Keep a DIMSE response for the ``send_*`` call that waits on it (pynetdicom's SCU race).

An association's reactor thread serves requests from the peer; ``Association.send_c_store``
and the other ``send_*`` calls pause it so that they, not the reactor, read the response.
They clear a checkpoint, then wait for a flag the reactor sets just *before* it waits at
that checkpoint and clears just after. A reactor that had passed the checkpoint when it was
cleared still shows the flag set: the call sends its request, the reactor takes the
response off the queue, logs "Received unexpected C-STORE service message" and drops it,
and the call returns an empty status at the DIMSE timeout (pynetdicom 3.0.4; the symptom
reported in pynetdicom issue #875).
CI met it once, on a loaded machine, in a test's C-STORE; the node's own deliveries and
health checks use the same calls.

:func:`keep_responses_for_sender` makes such an association's reactor put a response back
on the queue while a call holds the checkpoint cleared, for that call to read; any other
response (one that came after its call gave up) is left to pynetdicom, which logs it.
The node sends only C-ECHO and C-STORE, one response each, so a response put back cannot
pass another of the same call.
"""

from __future__ import annotations

from typing import Any

from pynetdicom.association import Association


def keep_responses_for_sender(assoc: Association) -> Association:
    """Guard ``assoc`` (an association this process requested) against the race; returns it."""
    if "_serve_request" in vars(assoc):  # guarded already
        return assoc
    serve = assoc._serve_request

    def serve_or_keep(msg: Any, context_id: int) -> None:
        if not msg.is_valid_request and not assoc._reactor_checkpoint.is_set():
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    # The reactor looks the method up on the instance each time it has a message.
    setattr(assoc, "_serve_request", serve_or_keep)  # noqa: B010
    return assoc
