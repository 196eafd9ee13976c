"""Importers: judged traces from Arize Phoenix or Langfuse into the queue, as quality events.

`mapping` turns one trace (spans or observations, and their judgements) into an event, purely;
`state` keeps each source's cursor and writes events into the queue before committing it;
`phoenix` and `langfuse` page their servers' REST APIs. `qe import phoenix|langfuse` and the
import sensors run them."""
